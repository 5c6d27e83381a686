"""workflows: orchestration."""
