"""Raw dataset layouts: readers (avsbench, ddeseg, vpo) and the synthetic generator."""
