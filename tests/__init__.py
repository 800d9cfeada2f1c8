"""openhnv tests in five tiers: unit/, netns/, kernel/, multikernel/, system/
(docs/testing.md says what each needs and proves).

The directories are packages so test modules are imported as ``tests.<tier>.<module>``
(two tiers may hold files of the same name) and helpers as ``tests.lib.<module>``.
"""
