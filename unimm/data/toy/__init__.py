"""Embedded data, apart from the data layer: the procedural shapes dataset and its pixel checker (`shapes`,
`shapes_eval`) and scikit-image's sample photos (`sample_photos`), for the quickstart, tests and smoke runs."""
