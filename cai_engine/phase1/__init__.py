"""Phase 1, SL-CAI: sample, critique and revise against principles; export the revisions for SFT."""
