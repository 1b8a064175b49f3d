"""The sampling job: guided sampling with per-index seeds, shards, the merged .npz."""
