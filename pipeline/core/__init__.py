"""Shared basics every package uses: errors, configuration, column names, storage, the CLI, fault
classification, per-query groups, ranking and TREC files. Nothing here imports a package above it."""
