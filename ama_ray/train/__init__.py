"""The one training loop (specialists and generalist) and what it runs on: task streams, checkpoints, launch."""
