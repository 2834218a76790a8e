"""The networks (one module per family under ``models/families/``, listed by ``models.registry``), their weights,
the model package format and the inference call; no Ray, no data reading, no process set-up."""
