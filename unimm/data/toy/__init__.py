"""Embedded data, apart from the data layer: the procedural shapes dataset and its pixel checker (`shapes`,
`shapes_eval`), scikit-image's sample photos (`sample_photos`) and the quickstart's data files (`quickstart`; its
program is `unimm.cli.quickstart`), for the quickstart, tests and smoke runs."""
