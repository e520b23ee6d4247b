-- Search walks one type's resources in `rid` order (keyset paging, and the scan plan used
-- when a search matches many resources); this index serves both without a sort.
CREATE INDEX resource_type_rid ON resource (res_type, rid);
