"""Phase 2, RLAIF: preference labels from a judge, the judge's quality gate, and preference exports."""
