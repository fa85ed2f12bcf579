"""Analyses over trained runs: ablations (Table 3, Figure 5), the family comparison, attention heat maps, training curves, a ridge baseline."""
