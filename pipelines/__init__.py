"""Preprocessing stages (installed as `ddeseg.pipelines`): each a function from disk to disk."""
