"""Datasets: readers for SYSU-MM01 and RegDB layouts, the synthetic visible-infrared set, samplers, transforms."""
