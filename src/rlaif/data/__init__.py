"""Input data: red-team and helpfulness prompt sources, hh-rlhf transcripts, Stack Exchange dumps."""
