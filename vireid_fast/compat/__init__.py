"""Drop-in APIs with the community code's exact signatures: one module per seed repository (clustercontrast, adca, pgm,
pclhd, hil, mult, salcr; see docs/compat.md) and the AGW evaluation (agw)."""
