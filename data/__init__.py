"""The films: reading the folders, patient-grouped splits, download, the one preprocessing function that training
and serving share, the checks before the model, and the tf.data training pipeline."""
