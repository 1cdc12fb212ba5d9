"""The ``aigcbot`` command line (`bot.cli.main`)."""
