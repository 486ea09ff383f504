"""Run configuration: command-line options, ``--config_file`` and ``--dataset_config``."""
