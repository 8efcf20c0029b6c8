"""Where files are written, for training, conversion and export alike (library level: no training toolkit, no
`datasets`): `output_dir` (one run per folder, locked), `manifest` (what we wrote, so we delete only that),
`staging` (written under a name this run created, then renamed) and `cards` (hub-ready model cards, licences)."""
