"""Drop-in APIs with the community code's exact signatures (cluster-contrast, AGW evaluation)."""
