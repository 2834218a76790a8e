"""Networks, their input preprocessing, dataset reading and the model package format; no HTTP. Ray appears only in
``models.local_ray`` (the Ray a process starts or joins and its clean stop, shared by tuning and serving), imported
inside its functions."""
