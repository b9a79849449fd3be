"""The reliability drills (`fusionrank drill`): private servers broken on purpose under load."""
