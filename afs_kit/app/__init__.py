"""Layer 10: the `afs-kit` command, papermill reports and reports/README.md."""
