"""Live process → model + page runs."""
