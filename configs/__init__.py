"""The configs shipped with ddeseg (`ddeseg.configs`): YAML files, loaded by name with `ddeseg.config.load_config`."""
