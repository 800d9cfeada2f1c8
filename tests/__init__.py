"""openhnv tests in three tiers: unit/, netns/, kernel/ (see README.md, "Tests").

The directories are packages so test modules are imported as ``tests.<tier>.<module>``
(two tiers may hold files of the same name) and helpers as ``tests.lib.<module>``.
"""
