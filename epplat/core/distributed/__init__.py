"""Process groups (world / TP / DP / EP) and launchers."""
