"""Run reports: ``report.md`` with its figures, and ``selectmoe compare``. Reads stage outputs only;
imported by the pipeline, the sweep and the demo, never by a stage."""
