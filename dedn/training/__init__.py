"""Training: the loop (`loop`), what an epoch reports and where it goes (`report`), and the one
Ray Train driver every job and trial runs (`driver`)."""
