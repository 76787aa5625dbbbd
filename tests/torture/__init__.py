"""Torture runs: carrier drops and kill -9 at random moments, then a checker that counts
what was submitted or placed at the ISP against what arrived."""
