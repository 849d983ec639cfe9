"""certify: randomized smoothing and dual randomized smoothing with sound radii."""
