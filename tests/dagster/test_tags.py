"""The run tag names candlestack spells are the ones Dagster reads."""

from dagster._core.storage import tags as dagster_tags

from assets import tags


def test_partition_tags_are_dagsters():
    assert tags.PARTITION_TAG == dagster_tags.PARTITION_NAME_TAG
    assert tags.RANGE_START_TAG == dagster_tags.ASSET_PARTITION_RANGE_START_TAG
    assert tags.RANGE_END_TAG == dagster_tags.ASSET_PARTITION_RANGE_END_TAG
