"""Field names of the product document: the one place code takes them from.

The mapping files in ``mappings/`` use the same names; a test checks that they agree.
"""

from __future__ import annotations

ID = "product_id"
TITLE = "title"
DESCRIPTION = "description"
BRAND = "brand"
CATEGORY = "category"  # category path, e.g. "Apparel > Topwear > Shirts"
ATTRIBUTES = "attributes"  # free-text attributes ("Navy Blue Casual Fall 2011")
ARTICLE_TYPE = "article_type"
COLOUR = "colour"
GENDER = "gender"
USAGE = "usage"
SEASON = "season"
PRICE = "price"
RATING = "rating"
POPULARITY = "popularity"
YEAR = "year"
IMAGE = "image"  # image path (relative to an images root) or URL
HAS_IMAGE = "has_image"

TEXT_VEC = "text_vec"
IMAGE_VEC = "image_vec"
IMAGE_COLOUR = "image_colour"  # the photo's pixel colour descriptor (indexing.photo_colour; mappings products-v3 and later)
# photo attributes (indexing.photo_attributes; mapping products-v4 and later)
PHOTO_COLOUR = "photo_colour"
PHOTO_COLOUR_CONFIDENCE = "photo_colour_confidence"
PHOTO_ARTICLE_TYPE = "photo_article_type"
PHOTO_ARTICLE_TYPE_CONFIDENCE = "photo_article_type_confidence"
PHOTO_GENDER = "photo_gender"
PHOTO_GENDER_CONFIDENCE = "photo_gender_confidence"
PHOTO_USAGE = "photo_usage"
PHOTO_USAGE_CONFIDENCE = "photo_usage_confidence"
COMPLETED_ATTRIBUTES = "completed_attributes"  # catalog fields whose missing value the photo completed, e.g. ["colour"]
# the catalog's value, else the one completed from the photo: what filters with include_completed match
EFFECTIVE_COLOUR = "effective_colour"
EFFECTIVE_ARTICLE_TYPE = "effective_article_type"
EFFECTIVE_GENDER = "effective_gender"
EFFECTIVE_USAGE = "effective_usage"
ATTRIBUTE_MODEL_ID = "attribute_model_id"
TEXT_MODEL_ID = "text_model_id"
IMAGE_MODEL_ID = "image_model_id"
CONTENT_HASH = "content_hash"
INDEXED_AT = "indexed_at"

VECTOR_FIELDS = (TEXT_VEC, IMAGE_VEC, IMAGE_COLOUR)

#: Text fields searched by BM25 and their default boosts (multi_match "best_fields").
BM25_FIELDS: dict[str, float] = {
    TITLE: 3.0,
    CATEGORY: 1.5,
    ATTRIBUTES: 1.0,
    BRAND: 2.0,
    DESCRIPTION: 0.5,
}

#: keyword fields usable in term filters
KEYWORD_FIELDS = (ID, ARTICLE_TYPE, COLOUR, GENDER, USAGE, SEASON, TEXT_MODEL_ID, IMAGE_MODEL_ID, CONTENT_HASH)
#: catalog attribute field -> its catalog-or-photo field (products-v4): Filters(include_completed=True) filter on these
EFFECTIVE_FIELDS = {COLOUR: EFFECTIVE_COLOUR, ARTICLE_TYPE: EFFECTIVE_ARTICLE_TYPE, GENDER: EFFECTIVE_GENDER, USAGE: EFFECTIVE_USAGE}
#: numeric fields usable in range filters
NUMERIC_FIELDS = (PRICE, RATING, POPULARITY, YEAR)
