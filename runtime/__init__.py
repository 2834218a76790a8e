"""What every process shares below the stages: errors, paths, the typed config loader, TensorFlow's threads and
precision, and the local Ray a command starts or joins (imported inside its functions)."""
