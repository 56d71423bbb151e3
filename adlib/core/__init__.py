"""Core: profiles, seeding and device, array conversions, the data home, checksums, versions."""
