"""The bottom layer every other folder may use: atomic files, the .npz format, process-group set-up,
preemption signals. It imports nothing of the project."""
