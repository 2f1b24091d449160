"""Backbones: AGW two-stream ResNet-50, a small ResNet for CPU runs, the EMA encoder."""
