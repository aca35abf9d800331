"""advplugin: protected face templates for existing face-recognition deployments."""

__version__ = "0.1.0"
