"""advplugin.gallery."""
