"""Method plug-ins for the engine (DCL baseline, PCLHD, SWPCL, MULT, HIL, SALCR)."""
