# makes conf/ a package, so that setuptools ships the presets
