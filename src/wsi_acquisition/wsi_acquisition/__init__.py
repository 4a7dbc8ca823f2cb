"""Virtual microscope, stage action server, camera publisher and scan orchestrator."""
