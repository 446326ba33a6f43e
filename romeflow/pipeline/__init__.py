"""The pipeline: manifests, delta files, the registry, the DVC workflow, exports and history."""
