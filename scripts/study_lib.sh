# Shared by the evidence scripts (scripts/*_study.sh, scripts/ablation.sh): source it.

copy_units() {  # copy_units SRC DEST STAGE... : SRC's committed units of those stages, unless DEST has them
  local src=$1 dest=$2; shift 2
  for stage in "$@"; do
    if [[ -d $src/$stage && ! -d $dest/$stage ]]; then
      mkdir -p "$dest" && cp -r "$src/$stage" "$dest/$stage"
    fi
  done
}
