"""The synthetic generator's parts: scenes and sounds (`scenes`), files in the real raw layouts
(`layouts`). The stage is `ddeseg.pipelines.synth`."""
