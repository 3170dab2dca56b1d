"""``diffalign-data``: tools that build and check preference data sets in the Pick-a-Pic layout."""
