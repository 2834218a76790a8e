"""Networks, their input preprocessing, dataset reading and the model package format (no Ray, no HTTP)."""
