"""Engine configuration, behind :mod:`sparc.sa.options` (its public face):
the mapping and its DSN, the conversion of each option, the defaults,
secrets kept out of messages, and configuration files."""
