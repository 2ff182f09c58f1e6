//! Strategic merge patch (`application/strategic-merge-patch+json`) for the built-in kinds.
//!
//! The merge-key table comes from the upstream Go struct tags, and the merge follows
//! `k8s.io/apimachinery/pkg/util/strategicpatch` as the API server applies it, down to the
//! order of merged lists, because `kubectl apply` and `kubectl patch` users see that order.
//! Where upstream would store leftover directive keys or nulls, or reject a harmless patch,
//! this merge does not:
//! - a value taken from the patch wholesale (a new field or list element, a replaced list)
//!   goes through the same merge against nothing, which consumes its nulls and directives;
//! - `$patch: merge` is accepted as the explicit default (upstream rejects it);
//! - `$patch: replace` on an object the original lacks sets that object (upstream drops it).
//!
//! Kinds outside the table merge like a JSON merge patch (RFC 7386): objects merge and lists
//! are replaced, as for a custom resource without a schema.

use std::fmt;

use serde_json::{Map, Value};

type Object = Map<String, Value>;

const PATCH_DIRECTIVE: &str = "$patch";
const RETAIN_KEYS_DIRECTIVE: &str = "$retainKeys";
const SET_ELEMENT_ORDER_PREFIX: &str = "$setElementOrder";
const DELETE_FROM_PRIMITIVE_LIST_PREFIX: &str = "$deleteFromPrimitiveList";

/// Why a strategic merge patch could not be applied. Every variant that concerns part of the
/// object names the field path, like `spec.containers[0]`.
#[derive(Debug, thiserror::Error)]
pub enum StrategicMergeError {
    #[error("strategic merge patch must be a json object, not {found}")]
    PatchNotObject { found: &'static str },
    #[error("object to patch must be a json object, not {found}")]
    OriginalNotObject { found: &'static str },
    #[error("{path}: unknown $patch directive {directive:?}; expected replace, merge or delete")]
    UnknownPatchDirective { path: String, directive: String },
    #[error("{path}: directive key {key} must have the form {prefix}/<field>")]
    MalformedDirectiveKey {
        path: String,
        key: String,
        prefix: &'static str,
    },
    #[error("{path}: {directive} must be a list, not {found}")]
    DirectiveNotList {
        path: String,
        directive: String,
        found: &'static str,
    },
    #[error("{path}: the patch sets field {field} that $retainKeys does not list")]
    FieldNotRetained { path: String, field: String },
    #[error("{path}: {source_list} element has no merge key {merge_key}")]
    MissingMergeKey {
        path: String,
        merge_key: &'static str,
        /// Which list the element is in: "patch", "original" or "$setElementOrder".
        source_list: &'static str,
    },
    #[error("{path}: the order of the elements in the patch does not match {directive}")]
    ElementOrderMismatch { path: String, directive: String },
    #[error("{path}: expected {expected}, found {found}")]
    UnexpectedType {
        path: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{path}: list elements are not all of one type")]
    MixedElementTypes { path: String },
    #[error("{path}: a list of lists can't be merged")]
    NestedList { path: String },
    #[error("{path}: a merged list can't hold null")]
    NullElement { path: String },
    #[error("{path}: list of objects has no merge key, so it can't be merged")]
    NoMergeKey { path: String },
}

type Result<T, E = StrategicMergeError> = std::result::Result<T, E>;

/// Applies the strategic merge `patch` to `original`, an object of kind `kind` ("Pod",
/// "Deployment", ...), and returns the patched object; `original` is left as it was.
pub fn apply_strategic_merge_patch(kind: &str, original: &Value, patch: &Value) -> Result<Value> {
    let Value::Object(patch_object) = patch else {
        return Err(StrategicMergeError::PatchNotObject {
            found: json_type_name(patch),
        });
    };
    let Value::Object(original_object) = original else {
        return Err(StrategicMergeError::OriginalNotObject {
            found: json_type_name(original),
        });
    };
    let merged = merge_object(
        original_object.clone(),
        patch_object,
        kind_fields(kind),
        &FieldPath::Root,
    )?;
    Ok(Value::Object(merged))
}

/// How a field of a built-in kind takes a strategic merge patch, as its Go struct tags say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldPatchStrategy {
    /// `patchStrategy:"merge"`: the patch's list merges into the live list instead of
    /// replacing it.
    pub merge: bool,
    /// `patchMergeKey`: the element field that identifies an element of a merged list of
    /// objects; `None` for a merged list of primitives, which is a set union.
    pub merge_key: Option<&'static str>,
    /// `patchStrategy:"retainKeys"`: `kubectl apply` sends `$retainKeys` for this object (or
    /// for each element of this list) so that switching between its one-of members clears the
    /// old one. The merge itself honours `$retainKeys` wherever it appears, as upstream does.
    pub retain_keys: bool,
}

/// The strategy of the field at `field_path` (field names from the object's root; list
/// elements are transparent, so `["spec", "containers", "env"]`) of kind `kind`; the default
/// (replace lists, merge objects) for a field or kind the table does not know.
pub fn field_patch_strategy(kind: &str, field_path: &[&str]) -> FieldPatchStrategy {
    let mut fields = kind_fields(kind);
    let mut strategy = FieldPatchStrategy::default();
    for name in field_path {
        let Some(field) = find_field(fields, name) else {
            return FieldPatchStrategy::default();
        };
        strategy = field.strategy;
        fields = field.fields;
    }
    strategy
}

// ---------------------------------------------------------------------------------------------
// The merge-key table.
//
// Built from the struct tags of k8s.io/api v0.33 (core/v1, apps/v1, discovery/v1,
// coordination/v1) and k8s.io/apimachinery meta/v1, which is the API version skiff serves. Only
// fields that carry a patch strategy, and the objects on the way to them, are listed; every
// other field merges as an object or is replaced as a list, which is what an empty tag means.

/// One field of a Go API type that either has a patch strategy or leads to one that does.
struct FieldSchema {
    name: &'static str,
    strategy: FieldPatchStrategy,
    /// The fields of this field's object type, or of each element's type for a list.
    fields: &'static [FieldSchema],
}

/// A field without a patch strategy of its own whose type has fields that do.
const fn nested(name: &'static str, fields: &'static [FieldSchema]) -> FieldSchema {
    FieldSchema {
        name,
        strategy: FieldPatchStrategy {
            merge: false,
            merge_key: None,
            retain_keys: false,
        },
        fields,
    }
}

/// `patchStrategy:"merge" patchMergeKey:"<merge_key>"`.
const fn merge_by_key(
    name: &'static str,
    merge_key: &'static str,
    fields: &'static [FieldSchema],
) -> FieldSchema {
    FieldSchema {
        name,
        strategy: FieldPatchStrategy {
            merge: true,
            merge_key: Some(merge_key),
            retain_keys: false,
        },
        fields,
    }
}

/// `patchStrategy:"merge,retainKeys" patchMergeKey:"<merge_key>"`.
const fn merge_by_key_retaining_keys(
    name: &'static str,
    merge_key: &'static str,
    fields: &'static [FieldSchema],
) -> FieldSchema {
    FieldSchema {
        name,
        strategy: FieldPatchStrategy {
            merge: true,
            merge_key: Some(merge_key),
            retain_keys: true,
        },
        fields,
    }
}

/// `patchStrategy:"merge"` on a list of strings: a set union.
const fn merge_primitives(name: &'static str) -> FieldSchema {
    FieldSchema {
        name,
        strategy: FieldPatchStrategy {
            merge: true,
            merge_key: None,
            retain_keys: false,
        },
        fields: &[],
    }
}

/// `patchStrategy:"retainKeys"` on an object.
const fn retaining_keys(name: &'static str, fields: &'static [FieldSchema]) -> FieldSchema {
    FieldSchema {
        name,
        strategy: FieldPatchStrategy {
            merge: false,
            merge_key: None,
            retain_keys: true,
        },
        fields,
    }
}

/// meta/v1 ObjectMeta.
const OBJECT_META: &[FieldSchema] = &[
    merge_by_key("ownerReferences", "uid", &[]),
    merge_primitives("finalizers"),
];

const METADATA: FieldSchema = nested("metadata", OBJECT_META);

/// core/v1 Container; EphemeralContainerCommon carries the same tags.
const CONTAINER: &[FieldSchema] = &[
    merge_by_key("ports", "containerPort", &[]),
    merge_by_key("env", "name", &[]),
    merge_by_key("volumeMounts", "mountPath", &[]),
    merge_by_key("volumeDevices", "devicePath", &[]),
];

/// core/v1 Volume: an ephemeral volume's claim template embeds an ObjectMeta.
const VOLUME: &[FieldSchema] = &[nested(
    "ephemeral",
    &[nested("volumeClaimTemplate", &[METADATA])],
)];

/// core/v1 PodSpec, shared by Pod and by every pod template.
const POD_SPEC: &[FieldSchema] = &[
    merge_by_key_retaining_keys("volumes", "name", VOLUME),
    merge_by_key("initContainers", "name", CONTAINER),
    merge_by_key("containers", "name", CONTAINER),
    merge_by_key("ephemeralContainers", "name", CONTAINER),
    merge_by_key("imagePullSecrets", "name", &[]),
    merge_by_key("hostAliases", "ip", &[]),
    merge_by_key("topologySpreadConstraints", "topologyKey", &[]),
    merge_by_key("schedulingGates", "name", &[]),
    merge_by_key_retaining_keys("resourceClaims", "name", &[]),
];

/// core/v1 ContainerStatus. The status lists themselves have no strategy, so these only
/// matter inside a status list that is being replaced.
const CONTAINER_STATUS: &[FieldSchema] = &[
    merge_by_key("volumeMounts", "mountPath", &[]),
    merge_by_key("allocatedResourcesStatus", "name", &[]),
];

const CONDITIONS_BY_TYPE: FieldSchema = merge_by_key("conditions", "type", &[]);

/// core/v1 PodStatus.
const POD_STATUS: &[FieldSchema] = &[
    CONDITIONS_BY_TYPE,
    merge_by_key("hostIPs", "ip", &[]),
    merge_by_key("podIPs", "ip", &[]),
    nested("initContainerStatuses", CONTAINER_STATUS),
    nested("containerStatuses", CONTAINER_STATUS),
    nested("ephemeralContainerStatuses", CONTAINER_STATUS),
    merge_by_key_retaining_keys("resourceClaimStatuses", "name", &[]),
];

/// core/v1 PodTemplateSpec, as embedded in the workload kinds' `spec.template`.
const POD_TEMPLATE: FieldSchema = nested("template", &[METADATA, nested("spec", POD_SPEC)]);

/// A status whose only tagged field is `conditions` merged by `type`.
const STATUS_WITH_CONDITIONS: FieldSchema = nested("status", &[CONDITIONS_BY_TYPE]);

const POD: &[FieldSchema] = &[
    METADATA,
    nested("spec", POD_SPEC),
    nested("status", POD_STATUS),
];

const DEPLOYMENT: &[FieldSchema] = &[
    METADATA,
    nested("spec", &[POD_TEMPLATE, retaining_keys("strategy", &[])]),
    STATUS_WITH_CONDITIONS,
];

/// ReplicaSet and DaemonSet: a pod template and conditions. DaemonSetSpec's updateStrategy
/// has no patch strategy, unlike Deployment's strategy.
const WORKLOAD_WITH_POD_TEMPLATE: &[FieldSchema] = &[
    METADATA,
    nested("spec", &[POD_TEMPLATE]),
    STATUS_WITH_CONDITIONS,
];

const NAMESPACE: &[FieldSchema] = &[METADATA, STATUS_WITH_CONDITIONS];

const SERVICE: &[FieldSchema] = &[
    METADATA,
    nested("spec", &[merge_by_key("ports", "port", &[])]),
    STATUS_WITH_CONDITIONS,
];

const NODE: &[FieldSchema] = &[
    METADATA,
    nested("spec", &[merge_primitives("podCIDRs")]),
    nested(
        "status",
        &[CONDITIONS_BY_TYPE, merge_by_key("addresses", "type", &[])],
    ),
];

const SERVICE_ACCOUNT: &[FieldSchema] = &[METADATA, merge_by_key("secrets", "name", &[])];

/// Endpoints (its subsets are atomic), Event, ConfigMap, Secret, EndpointSlice and Lease:
/// nothing but the metadata has a patch strategy.
const METADATA_ONLY: &[FieldSchema] = &[METADATA];

fn kind_fields(kind: &str) -> &'static [FieldSchema] {
    match kind {
        "Pod" => POD,
        "Deployment" => DEPLOYMENT,
        "ReplicaSet" | "DaemonSet" => WORKLOAD_WITH_POD_TEMPLATE,
        "Namespace" => NAMESPACE,
        "Service" => SERVICE,
        "Node" => NODE,
        "ServiceAccount" => SERVICE_ACCOUNT,
        "Endpoints" | "Event" | "ConfigMap" | "Secret" | "EndpointSlice" | "Lease" => METADATA_ONLY,
        // No schema: objects merge and lists are replaced, as in a JSON merge patch.
        _ => &[],
    }
}

fn find_field(fields: &'static [FieldSchema], name: &str) -> Option<&'static FieldSchema> {
    fields.iter().find(|field| field.name == name)
}

fn strategy_of(schema: Option<&FieldSchema>) -> FieldPatchStrategy {
    schema.map(|field| field.strategy).unwrap_or_default()
}

fn fields_of(schema: Option<&'static FieldSchema>) -> &'static [FieldSchema] {
    schema.map_or(&[], |field| field.fields)
}

// ---------------------------------------------------------------------------------------------
// Field paths for error messages, built on the stack and rendered only when an error needs one.

#[derive(Clone, Copy)]
enum FieldPath<'a> {
    Root,
    Field(&'a FieldPath<'a>, &'a str),
    Index(&'a FieldPath<'a>, usize),
}

impl fmt::Display for FieldPath<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldPath::Root => formatter.write_str("<root>"),
            FieldPath::Field(FieldPath::Root, name) => formatter.write_str(name),
            FieldPath::Field(parent, name) => write!(formatter, "{parent}.{name}"),
            FieldPath::Index(parent, index) => write!(formatter, "{parent}[{index}]"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Objects.

/// The `$patch` directive of one object in the patch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ObjectDirective {
    Merge,
    Replace,
    Delete,
}

fn object_directive(patch: &Object, path: &FieldPath) -> Result<ObjectDirective> {
    match patch.get(PATCH_DIRECTIVE) {
        None => Ok(ObjectDirective::Merge),
        Some(Value::String(directive)) if directive == "merge" => Ok(ObjectDirective::Merge),
        Some(Value::String(directive)) if directive == "replace" => Ok(ObjectDirective::Replace),
        Some(Value::String(directive)) if directive == "delete" => Ok(ObjectDirective::Delete),
        Some(other) => Err(StrategicMergeError::UnknownPatchDirective {
            path: path.to_string(),
            directive: match other {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            },
        }),
    }
}

/// Merges `patch` into `original`. `$patch: delete` empties the object rather than removing
/// it, as upstream does when the object exists.
fn merge_object(
    original: Object,
    patch: &Object,
    fields: &'static [FieldSchema],
    path: &FieldPath,
) -> Result<Object> {
    match object_directive(patch, path)? {
        ObjectDirective::Merge => merge_object_fields(original, patch, fields, path),
        ObjectDirective::Replace => merge_object_fields(Object::new(), patch, fields, path),
        ObjectDirective::Delete => Ok(Object::new()),
    }
}

fn is_directive_key(key: &str) -> bool {
    key == PATCH_DIRECTIVE
        || key == RETAIN_KEYS_DIRECTIVE
        || key.starts_with(SET_ELEMENT_ORDER_PREFIX)
        || key.starts_with(DELETE_FROM_PRIMITIVE_LIST_PREFIX)
}

/// The field a `<prefix>/<field>` directive key names, or `None` if `key` is not one.
fn directive_target<'k>(
    key: &'k str,
    prefix: &'static str,
    path: &FieldPath,
) -> Result<Option<&'k str>> {
    let Some(rest) = key.strip_prefix(prefix) else {
        return Ok(None);
    };
    match rest.strip_prefix('/') {
        Some(field) if !field.is_empty() => Ok(Some(field)),
        _ => Err(StrategicMergeError::MalformedDirectiveKey {
            path: path.to_string(),
            key: key.to_owned(),
            prefix,
        }),
    }
}

/// Merges the fields of `patch` into `original`, ignoring any `$patch` directive in it. The
/// directives go in upstream's order: `$retainKeys` clears fields first, then the lists named
/// by `$setElementOrder` merge and take their order, then the other fields merge, and the
/// `$deleteFromPrimitiveList` removals come last so that a value the same patch also adds is
/// still removed.
fn merge_object_fields(
    mut original: Object,
    patch: &Object,
    fields: &'static [FieldSchema],
    path: &FieldPath,
) -> Result<Object> {
    if let Some(retained) = patch.get(RETAIN_KEYS_DIRECTIVE) {
        apply_retain_keys(&mut original, patch, retained, path)?;
    }

    let mut ordered_lists: Vec<&str> = Vec::new();
    for (key, order) in patch {
        if let Some(list_name) = directive_target(key, SET_ELEMENT_ORDER_PREFIX, path)?
            && apply_element_order(&mut original, patch, key, list_name, order, fields, path)?
        {
            ordered_lists.push(list_name);
        }
    }

    for (key, patch_value) in patch {
        if is_directive_key(key) || ordered_lists.contains(&key.as_str()) {
            continue;
        }
        let field_path = FieldPath::Field(path, key);
        merge_field(
            &mut original,
            key,
            patch_value,
            find_field(fields, key),
            &field_path,
        )?;
    }

    for (key, values) in patch {
        if let Some(list_name) = directive_target(key, DELETE_FROM_PRIMITIVE_LIST_PREFIX, path)? {
            delete_from_primitive_list(&mut original, key, list_name, values, path)?;
        }
    }
    Ok(original)
}

fn merge_field(
    original: &mut Object,
    key: &str,
    patch_value: &Value,
    schema: Option<&'static FieldSchema>,
    path: &FieldPath,
) -> Result<()> {
    if patch_value.is_null() {
        remove_field(original, key);
        return Ok(());
    }
    let merged = match original.get_mut(key) {
        Some(slot) if !slot.is_null() => {
            merge_value(std::mem::take(slot), patch_value, schema, path)?
        }
        _ => materialize(patch_value, schema, path)?,
    };
    match merged {
        Some(value) => {
            original.insert(key.to_owned(), value);
        }
        None => {
            remove_field(original, key);
        }
    }
    Ok(())
}

/// Removes a field without moving the others, which `Map::remove` does when serde_json
/// preserves key order.
fn remove_field(object: &mut Object, key: &str) {
    object.retain(|existing, _| existing != key);
}

/// Merges one patch value into the live value of the same field; `None` removes the field.
fn merge_value(
    live: Value,
    patch_value: &Value,
    schema: Option<&'static FieldSchema>,
    path: &FieldPath,
) -> Result<Option<Value>> {
    match (live, patch_value) {
        (Value::Object(live_object), Value::Object(patch_object)) => Ok(Some(Value::Object(
            merge_object(live_object, patch_object, fields_of(schema), path)?,
        ))),
        (Value::Array(live_items), Value::Array(patch_items)) => Ok(Some(Value::Array(
            merge_list(live_items, patch_items, schema, path)?.merged,
        ))),
        // Different types, or scalars: the patch's value wins.
        (_, patch_value) => materialize(patch_value, schema, path),
    }
}

/// The value a patch value becomes where there is nothing to merge it into: the same merge
/// against an empty value, so that its nulls and directives are consumed rather than stored.
/// `None` means the field stays absent (a null, or an object with `$patch: delete`).
fn materialize(
    patch_value: &Value,
    schema: Option<&'static FieldSchema>,
    path: &FieldPath,
) -> Result<Option<Value>> {
    match patch_value {
        Value::Null => Ok(None),
        Value::Object(patch_object) => match object_directive(patch_object, path)? {
            ObjectDirective::Delete => Ok(None),
            ObjectDirective::Merge | ObjectDirective::Replace => Ok(Some(Value::Object(
                merge_object_fields(Object::new(), patch_object, fields_of(schema), path)?,
            ))),
        },
        Value::Array(patch_items) => Ok(Some(Value::Array(
            merge_list(Vec::new(), patch_items, schema, path)?.merged,
        ))),
        scalar => Ok(Some(scalar.clone())),
    }
}

/// `$retainKeys`: the object keeps only the listed fields (before the patch's own fields
/// merge), and the patch may set no field the list leaves out.
fn apply_retain_keys(
    original: &mut Object,
    patch: &Object,
    retained: &Value,
    path: &FieldPath,
) -> Result<()> {
    let Value::Array(retained) = retained else {
        return Err(StrategicMergeError::DirectiveNotList {
            path: path.to_string(),
            directive: RETAIN_KEYS_DIRECTIVE.to_owned(),
            found: json_type_name(retained),
        });
    };
    let is_retained = |key: &str| retained.iter().any(|name| name.as_str() == Some(key));
    for (key, value) in patch {
        if !value.is_null() && !is_directive_key(key) && !is_retained(key) {
            return Err(StrategicMergeError::FieldNotRetained {
                path: path.to_string(),
                field: key.clone(),
            });
        }
    }
    original.retain(|key, _| is_retained(key));
    Ok(())
}

/// `$deleteFromPrimitiveList/<list>`: removes every listed value from a primitive list.
fn delete_from_primitive_list(
    original: &mut Object,
    directive_key: &str,
    list_name: &str,
    values: &Value,
    path: &FieldPath,
) -> Result<()> {
    let list_path = FieldPath::Field(path, list_name);
    let Value::Array(to_delete) = values else {
        return Err(StrategicMergeError::DirectiveNotList {
            path: list_path.to_string(),
            directive: directive_key.to_owned(),
            found: json_type_name(values),
        });
    };
    let directive_path = FieldPath::Field(path, directive_key);
    for (index, value) in to_delete.iter().enumerate() {
        if value.is_object() || value.is_array() {
            return Err(StrategicMergeError::UnexpectedType {
                path: FieldPath::Index(&directive_path, index).to_string(),
                expected: "a string, number or boolean",
                found: json_type_name(value),
            });
        }
    }
    if let Some(Value::Array(items)) = original.get_mut(list_name) {
        items.retain(|item| !to_delete.iter().any(|value| values_equal(value, item)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Lists.

/// The result of merging one list.
struct ListMerge {
    merged: Vec<Value>,
    /// Identities (merge-key values, or the values themselves in a primitive list) of the live
    /// list as `$setElementOrder` sees it once the merge is done: the live elements that survived
    /// `$patch: delete`, then the new elements in the slots the deletions freed. Upstream's
    /// ordering reads the live list after the merge has rewritten it in place, so matching it
    /// means comparing against exactly this.
    live_order: Vec<Value>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ElementKind {
    Object,
    String,
    Number,
    Bool,
}

/// The one type shared by the elements of a list about to be merged; `None` if both are empty.
fn element_kind(live: &[Value], patch: &[Value], path: &FieldPath) -> Result<Option<ElementKind>> {
    let mut kind = None;
    for element in live.iter().chain(patch) {
        let element_kind = match element {
            Value::Object(_) => ElementKind::Object,
            Value::String(_) => ElementKind::String,
            Value::Number(_) => ElementKind::Number,
            Value::Bool(_) => ElementKind::Bool,
            Value::Array(_) => {
                return Err(StrategicMergeError::NestedList {
                    path: path.to_string(),
                });
            }
            Value::Null => {
                return Err(StrategicMergeError::NullElement {
                    path: path.to_string(),
                });
            }
        };
        match kind {
            None => kind = Some(element_kind),
            Some(previous) if previous != element_kind => {
                return Err(StrategicMergeError::MixedElementTypes {
                    path: path.to_string(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(kind)
}

/// The merge key a list of this kind is merged by: `None` for primitives. Fails when the
/// elements do not fit the field's strategy.
fn merge_key_for(
    kind: ElementKind,
    strategy: FieldPatchStrategy,
    path: &FieldPath,
) -> Result<Option<&'static str>> {
    match (kind, strategy.merge_key) {
        (ElementKind::Object, Some(merge_key)) => Ok(Some(merge_key)),
        (ElementKind::Object, None) => Err(StrategicMergeError::NoMergeKey {
            path: path.to_string(),
        }),
        (_, Some(_)) => Err(StrategicMergeError::UnexpectedType {
            path: path.to_string(),
            expected: "a list of objects",
            found: "a list of primitives",
        }),
        (_, None) => Ok(None),
    }
}

fn merge_list(
    live: Vec<Value>,
    patch: &[Value],
    schema: Option<&'static FieldSchema>,
    path: &FieldPath,
) -> Result<ListMerge> {
    let strategy = strategy_of(schema);
    if !strategy.merge {
        return Ok(ListMerge {
            merged: replacement_list(patch, fields_of(schema), path)?,
            live_order: Vec::new(),
        });
    }
    let Some(kind) = element_kind(&live, patch, path)? else {
        return Ok(ListMerge {
            merged: live,
            live_order: Vec::new(),
        });
    };
    match merge_key_for(kind, strategy, path)? {
        Some(merge_key) => merge_keyed_list(live, patch, merge_key, fields_of(schema), path),
        None => Ok(merge_primitive_list(live, patch)),
    }
}

/// A list without a merge strategy: the patch's elements, with directive elements dropped
/// (upstream drops them too) and every object merged against nothing.
fn replacement_list(
    patch: &[Value],
    fields: &'static [FieldSchema],
    path: &FieldPath,
) -> Result<Vec<Value>> {
    let mut items = Vec::with_capacity(patch.len());
    for (index, item) in patch.iter().enumerate() {
        let item_path = FieldPath::Index(path, index);
        match item {
            Value::Object(object) if object.contains_key(PATCH_DIRECTIVE) => {
                // Still reject a misspelt directive rather than drop it silently.
                object_directive(object, &item_path)?;
            }
            Value::Object(object) => items.push(Value::Object(merge_object_fields(
                Object::new(),
                object,
                fields,
                &item_path,
            )?)),
            Value::Array(nested) => {
                items.push(Value::Array(replacement_list(nested, &[], &item_path)?));
            }
            other => items.push(other.clone()),
        }
    }
    Ok(items)
}

/// The merge-key value of a list element, if it is an object that has one.
fn merge_key_value<'v>(element: &'v Value, merge_key: &str) -> Option<&'v Value> {
    element
        .as_object()?
        .get(merge_key)
        .filter(|value| !value.is_null())
}

/// Pairs each element with its identity: its merge-key value, or itself for primitives.
fn with_identities(
    elements: Vec<Value>,
    merge_key: Option<&'static str>,
    path: &FieldPath,
    source_list: &'static str,
) -> Result<Vec<(Value, Value)>> {
    elements
        .into_iter()
        .enumerate()
        .map(|(index, element)| {
            let identity = match merge_key {
                None => element.clone(),
                Some(merge_key) => {
                    merge_key_value(&element, merge_key)
                        .cloned()
                        .ok_or_else(|| StrategicMergeError::MissingMergeKey {
                            path: FieldPath::Index(path, index).to_string(),
                            merge_key,
                            source_list,
                        })?
                }
            };
            Ok((identity, element))
        })
        .collect()
}

/// A list merged by key: `$patch: delete` elements remove every live element with that key,
/// `$patch: replace` makes the patch's other elements the whole list, and each other element
/// merges into the live element with its key or, if there is none, is added.
fn merge_keyed_list(
    mut live: Vec<Value>,
    patch: &[Value],
    merge_key: &'static str,
    fields: &'static [FieldSchema],
    path: &FieldPath,
) -> Result<ListMerge> {
    let mut replace_whole_list = false;
    // (index in the patch, element, merge-key value) of the elements that merge.
    let mut merging: Vec<(usize, &Object, &Value)> = Vec::new();
    for (index, element) in patch.iter().enumerate() {
        let element_path = FieldPath::Index(path, index);
        let Value::Object(element_object) = element else {
            return Err(StrategicMergeError::UnexpectedType {
                path: element_path.to_string(),
                expected: "an object",
                found: json_type_name(element),
            });
        };
        let key_value = merge_key_value(element, merge_key);
        let missing_key = || StrategicMergeError::MissingMergeKey {
            path: element_path.to_string(),
            merge_key,
            source_list: "patch",
        };
        match object_directive(element_object, &element_path)? {
            ObjectDirective::Delete => {
                let key_value = key_value.ok_or_else(missing_key)?;
                live.retain(|item| {
                    !merge_key_value(item, merge_key)
                        .is_some_and(|live_key| values_equal(live_key, key_value))
                });
            }
            ObjectDirective::Replace => replace_whole_list = true,
            // A bare `{"$patch": "merge"}` only restates the default.
            ObjectDirective::Merge
                if key_value.is_none()
                    && element_object.len() == 1
                    && element_object.contains_key(PATCH_DIRECTIVE) => {}
            ObjectDirective::Merge => {
                merging.push((index, element_object, key_value.ok_or_else(missing_key)?));
            }
        }
    }

    if replace_whole_list {
        let live_order = with_identities(live, Some(merge_key), path, "original")?
            .into_iter()
            .map(|(identity, _)| identity)
            .collect();
        let mut merged = Vec::with_capacity(merging.len());
        for (index, element, _) in merging {
            let element_path = FieldPath::Index(path, index);
            merged.push(Value::Object(merge_object(
                Object::new(),
                element,
                fields,
                &element_path,
            )?));
        }
        return Ok(ListMerge { merged, live_order });
    }

    let mut live = with_identities(live, Some(merge_key), path, "original")?;
    let live_after_deletions: Vec<Value> =
        live.iter().map(|(identity, _)| identity.clone()).collect();
    let mut live_order = live_after_deletions.clone();
    for &(index, element, key_value) in &merging {
        let element_path = FieldPath::Index(path, index);
        match live
            .iter()
            .position(|(identity, _)| values_equal(identity, key_value))
        {
            Some(position) => {
                let existing = match std::mem::take(&mut live[position].1) {
                    Value::Object(existing) => existing,
                    // element_kind has already checked that every live element is an object.
                    _ => Object::new(),
                };
                live[position].1 =
                    Value::Object(merge_object(existing, element, fields, &element_path)?);
            }
            None => {
                let added = merge_object(Object::new(), element, fields, &element_path)?;
                live.push((key_value.clone(), Value::Object(added)));
                live_order.push(key_value.clone());
            }
        }
    }

    let patch_order: Vec<&Value> = merging.iter().map(|&(_, _, key_value)| key_value).collect();
    let merged = order_merged_list(live, &patch_order, &live_after_deletions);
    Ok(ListMerge { merged, live_order })
}

/// A merged list of primitives: the union of both lists without duplicates.
fn merge_primitive_list(live: Vec<Value>, patch: &[Value]) -> ListMerge {
    let mut union: Vec<(Value, Value)> = Vec::with_capacity(live.len() + patch.len());
    for item in live.iter().chain(patch) {
        if !union
            .iter()
            .any(|(identity, _)| values_equal(identity, item))
        {
            union.push((item.clone(), item.clone()));
        }
    }
    let patch_order: Vec<&Value> = patch.iter().collect();
    let merged = order_merged_list(union, &patch_order, &live);
    ListMerge {
        merged,
        live_order: live,
    }
}

fn position_of(list: &[impl std::borrow::Borrow<Value>], identity: &Value) -> Option<usize> {
    list.iter()
        .position(|candidate| values_equal(candidate.borrow(), identity))
}

/// Orders a merged list as upstream does. Elements that `patch_order` names come in that
/// order; the others keep the order of `live_order`; and the two runs are interleaved by
/// putting a live-only element first only when `live_order` has it before the next named
/// element. So a named element new to the list goes ahead of the live-only elements still
/// waiting: a plain `kubectl patch` that adds a container puts it first.
fn order_merged_list(
    merged: Vec<(Value, Value)>,
    patch_order: &[&Value],
    live_order: &[Value],
) -> Vec<Value> {
    let (mut named, mut live_only): (Vec<_>, Vec<_>) = merged
        .into_iter()
        .partition(|(identity, _)| position_of(patch_order, identity).is_some());
    named.sort_by_key(|(identity, _)| position_of(patch_order, identity));
    // Elements the live order lacks sort last; this happens only for a patch that names
    // elements that `$setElementOrder` leaves out, which upstream orders arbitrarily.
    live_only.sort_by_key(|(identity, _)| position_of(live_order, identity).unwrap_or(usize::MAX));

    let mut ordered = Vec::with_capacity(named.len() + live_only.len());
    let mut named = named.into_iter().peekable();
    let mut live_only = live_only.into_iter().peekable();
    loop {
        let take_live_only = match (live_only.peek(), named.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((live_identity, _)), Some((named_identity, _))) => matches!(
                (position_of(live_order, live_identity), position_of(live_order, named_identity)),
                (Some(live_position), Some(named_position)) if live_position < named_position
            ),
        };
        let next = if take_live_only {
            live_only.next()
        } else {
            named.next()
        };
        if let Some((_, element)) = next {
            ordered.push(element);
        }
    }
    ordered
}

/// `$setElementOrder/<list>`: merges the patch's list (if any) and orders the result by the
/// directive. Returns whether it consumed the list, which then must not merge again.
fn apply_element_order(
    original: &mut Object,
    patch: &Object,
    directive_key: &str,
    list_name: &str,
    order: &Value,
    fields: &'static [FieldSchema],
    path: &FieldPath,
) -> Result<bool> {
    let list_path = FieldPath::Field(path, list_name);
    let Value::Array(order) = order else {
        return Err(StrategicMergeError::DirectiveNotList {
            path: list_path.to_string(),
            directive: directive_key.to_owned(),
            found: json_type_name(order),
        });
    };
    let schema = find_field(fields, list_name);
    let strategy = strategy_of(schema);
    // A replaced list already has the patch's order, and a null removes the list outright.
    if !strategy.merge {
        return Ok(false);
    }
    let patch_list = match patch.get(list_name) {
        None => None,
        Some(Value::Null) => return Ok(false),
        Some(Value::Array(items)) => Some(items.as_slice()),
        Some(other) => {
            return Err(StrategicMergeError::UnexpectedType {
                path: list_path.to_string(),
                expected: "a list",
                found: json_type_name(other),
            });
        }
    };
    let live_list = match original.get_mut(list_name) {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(std::mem::take(items)),
        Some(other) => {
            return Err(StrategicMergeError::UnexpectedType {
                path: list_path.to_string(),
                expected: "a list",
                found: json_type_name(other),
            });
        }
    };
    let kind = element_kind(
        live_list.as_deref().unwrap_or_default(),
        patch_list.unwrap_or_default(),
        &list_path,
    )?;
    let merge_key = match kind {
        Some(kind) => merge_key_for(kind, strategy, &list_path)?,
        None => strategy.merge_key,
    };
    let directive_path = FieldPath::Field(path, directive_key);
    let order_identities = order
        .iter()
        .enumerate()
        .map(|(index, item)| match merge_key {
            None => Ok(item),
            Some(merge_key) => merge_key_value(item, merge_key).ok_or_else(|| {
                StrategicMergeError::MissingMergeKey {
                    path: FieldPath::Index(&directive_path, index).to_string(),
                    merge_key,
                    source_list: SET_ELEMENT_ORDER_PREFIX,
                }
            }),
        })
        .collect::<Result<Vec<&Value>>>()?;
    if let Some(patch_list) = patch_list {
        check_patch_follows_order(
            patch_list,
            &order_identities,
            merge_key,
            directive_key,
            &list_path,
        )?;
    }

    let live_len = live_list.as_ref().map_or(0, Vec::len);
    let ListMerge {
        merged,
        mut live_order,
    } = match (live_list, patch_list) {
        (None, None) => return Ok(true),
        (Some(live), None) => {
            let live = with_identities(live, merge_key, &list_path, "original")?;
            ListMerge {
                live_order: live.iter().map(|(identity, _)| identity.clone()).collect(),
                merged: live.into_iter().map(|(_, element)| element).collect(),
            }
        }
        (live, Some(patch_items)) => {
            merge_list(live.unwrap_or_default(), patch_items, schema, &list_path)?
        }
    };
    live_order.truncate(live_len);
    let merged = with_identities(merged, merge_key, &list_path, "original")?;
    let ordered = order_merged_list(merged, &order_identities, &live_order);
    original.insert(list_name.to_owned(), Value::Array(ordered));
    Ok(true)
}

/// The patch's own elements (directive elements aside) must appear in `$setElementOrder` in
/// the same relative order; otherwise the patch contradicts itself.
fn check_patch_follows_order(
    patch_list: &[Value],
    order_identities: &[&Value],
    merge_key: Option<&'static str>,
    directive_key: &str,
    list_path: &FieldPath,
) -> Result<()> {
    if patch_list.is_empty() || order_identities.is_empty() {
        return Ok(());
    }
    let mut remaining_order = order_identities.iter();
    for (index, item) in patch_list.iter().enumerate() {
        if item
            .as_object()
            .is_some_and(|object| object.contains_key(PATCH_DIRECTIVE))
        {
            continue;
        }
        let identity = match merge_key {
            None => item,
            Some(merge_key) => merge_key_value(item, merge_key).ok_or_else(|| {
                StrategicMergeError::MissingMergeKey {
                    path: FieldPath::Index(list_path, index).to_string(),
                    merge_key,
                    source_list: "patch",
                }
            })?,
        };
        if !remaining_order.any(|ordered| values_equal(ordered, identity)) {
            return Err(StrategicMergeError::ElementOrderMismatch {
                path: list_path.to_string(),
                directive: directive_key.to_owned(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Values.

/// JSON equality where numbers compare by value, so that a merge key of `80` matches `80.0`
/// as it does in upstream's float64 decoding.
fn values_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => {
            left == right || matches!((left.as_f64(), right.as_f64()), (Some(l), Some(r)) if l == r)
        }
        (Value::Array(left), Value::Array(right)) => {
            left.len() == right.len() && left.iter().zip(right).all(|(l, r)| values_equal(l, r))
        }
        (Value::Object(left), Value::Object(right)) => {
            left.len() == right.len()
                && left
                    .iter()
                    .all(|(key, l)| right.get(key).is_some_and(|r| values_equal(l, r)))
        }
        (left, right) => left == right,
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn patched(kind: &str, original: Value, patch: Value) -> Value {
        let result = apply_strategic_merge_patch(kind, &original, &patch)
            .unwrap_or_else(|error| panic!("patch {patch} failed: {error}"));
        assert_no_directives(&result);
        result
    }

    fn patch_error(kind: &str, original: Value, patch: Value) -> String {
        match apply_strategic_merge_patch(kind, &original, &patch) {
            Ok(result) => panic!("patch {patch} should fail, got {result}"),
            Err(error) => error.to_string(),
        }
    }

    fn assert_no_directives(value: &Value) {
        match value {
            Value::Object(object) => {
                for (key, field) in object {
                    assert!(!is_directive_key(key), "directive {key} left in {value}");
                    assert_no_directives(field);
                }
            }
            Value::Array(items) => items.iter().for_each(assert_no_directives),
            _ => {}
        }
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|item| item["name"].as_str().expect("a name"))
            .collect()
    }

    fn deployment_with_containers(containers: Value) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": containers}
                }
            }
        })
    }

    fn two_container_deployment() -> Value {
        deployment_with_containers(json!([
            {
                "name": "app",
                "image": "x:1",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "prod"}]
            },
            {"name": "sidecar", "image": "proxy:1"}
        ]))
    }

    #[test]
    fn maps_merge_recursively_and_null_deletes_a_key() {
        let original = json!({
            "kind": "ConfigMap",
            "metadata": {"name": "settings", "labels": {"app": "web", "tier": "front"}},
            "data": {"a": "1", "b": "2"}
        });
        let result = patched(
            "ConfigMap",
            original,
            json!({"metadata": {"labels": {"tier": null, "team": "core"}}, "data": {"b": "3", "c": "4"}}),
        );
        assert_eq!(
            result,
            json!({
                "kind": "ConfigMap",
                "metadata": {"name": "settings", "labels": {"app": "web", "team": "core"}},
                "data": {"a": "1", "b": "3", "c": "4"}
            })
        );
    }

    #[test]
    fn null_for_an_absent_key_and_nulls_inside_new_values_are_dropped() {
        let result = patched(
            "Pod",
            json!({"metadata": {"name": "p"}}),
            json!({"metadata": {"annotations": {"a": "1", "b": null}}, "spec": null}),
        );
        assert_eq!(
            result,
            json!({"metadata": {"name": "p", "annotations": {"a": "1"}}})
        );
    }

    #[test]
    fn a_patch_that_is_not_an_object_is_rejected() {
        for patch in [json!([]), json!(null), json!("spec"), json!(3)] {
            let error = apply_strategic_merge_patch("Pod", &json!({}), &patch).unwrap_err();
            assert!(
                matches!(error, StrategicMergeError::PatchNotObject { .. }),
                "{error}"
            );
        }
        assert_eq!(
            patch_error("Pod", json!({}), json!([{"op": "add"}])),
            "strategic merge patch must be a json object, not a list"
        );
        assert_eq!(
            patch_error("Pod", json!("pod"), json!({})),
            "object to patch must be a json object, not a string"
        );
    }

    #[test]
    fn the_original_is_not_modified() {
        let original = two_container_deployment();
        let before = original.clone();
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "x:2"},
            {"name": "sidecar", "$patch": "delete"}
        ]}}}});
        let result = apply_strategic_merge_patch("Deployment", &original, &patch).unwrap();
        assert_eq!(original, before);
        assert_ne!(result, original);
    }

    #[test]
    fn kubectl_patch_updates_only_the_named_container() {
        // kubectl patch deployment web --type strategic \
        //   -p '{"spec":{"template":{"spec":{"containers":[{"name":"app","image":"x:2"}]}}}}'
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "x:2"}]}}}});
        let result = patched("Deployment", two_container_deployment(), patch);
        let mut expected = two_container_deployment();
        expected["spec"]["template"]["spec"]["containers"][0]["image"] = json!("x:2");
        assert_eq!(result, expected);
    }

    #[test]
    fn every_pod_template_kind_shares_the_pod_spec_table() {
        for kind in ["Deployment", "ReplicaSet", "DaemonSet"] {
            let patch = json!({"spec": {"template": {"spec": {"containers": [
                {"name": "sidecar", "env": [{"name": "LOG", "value": "debug"}]}
            ]}}}});
            let result = patched(kind, two_container_deployment(), patch);
            let containers = &result["spec"]["template"]["spec"]["containers"];
            assert_eq!(names(containers), ["app", "sidecar"], "{kind}");
            assert_eq!(containers[1]["image"], "proxy:1", "{kind}");
            assert_eq!(
                containers[1]["env"],
                json!([{"name": "LOG", "value": "debug"}])
            );
            assert_eq!(
                field_patch_strategy(kind, &["spec", "template", "spec", "containers"]),
                field_patch_strategy("Pod", &["spec", "containers"]),
            );
        }
    }

    #[test]
    fn a_container_new_to_the_list_goes_first_without_an_element_order() {
        // Upstream puts patch elements that the live list lacks ahead of the live ones.
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "debug", "image": "busybox"}]}}}});
        let result = patched("Deployment", two_container_deployment(), patch);
        let containers = &result["spec"]["template"]["spec"]["containers"];
        assert_eq!(names(containers), ["debug", "app", "sidecar"]);
        assert_eq!(containers[1]["ports"][0]["containerPort"], 8080);
    }

    #[test]
    fn kubectl_apply_element_order_places_a_new_container() {
        // What kubectl apply sends after a container is appended to the manifest.
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}, {"name": "metrics"}],
            "containers": [{"image": "metrics:1", "name": "metrics"}]
        }}}});
        let result = patched("Deployment", two_container_deployment(), patch);
        assert_eq!(
            names(&result["spec"]["template"]["spec"]["containers"]),
            ["app", "sidecar", "metrics"]
        );
    }

    #[test]
    fn kubectl_apply_element_order_reorders_and_keeps_server_added_containers() {
        let original = deployment_with_containers(json!([
            {"name": "app", "image": "x:1"},
            {"name": "istio-proxy", "image": "proxy:1"},
            {"name": "helper", "image": "h:1"}
        ]));
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "helper"}, {"name": "app"}],
            "containers": [{"image": "x:2", "name": "app"}]
        }}}});
        let result = patched("Deployment", original, patch);
        let containers = &result["spec"]["template"]["spec"]["containers"];
        // The server-only container goes ahead of the first named container that the live
        // list has after it.
        assert_eq!(names(containers), ["istio-proxy", "helper", "app"]);
        assert_eq!(containers[2]["image"], "x:2");
    }

    #[test]
    fn kubectl_apply_renaming_a_container_matches_upstream_order() {
        let original = deployment_with_containers(json!([
            {"name": "web", "image": "web:1"},
            {"name": "injected", "image": "agent:1"}
        ]));
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "frontend"}],
            "containers": [{"image": "frontend:1", "name": "frontend"}, {"$patch": "delete", "name": "web"}]
        }}}});
        let result = patched("Deployment", original, patch);
        // Upstream orders against the live list as the merge left it: "injected" where "web"
        // was, then "frontend" in the freed slot.
        assert_eq!(
            names(&result["spec"]["template"]["spec"]["containers"]),
            ["injected", "frontend"]
        );
    }

    #[test]
    fn container_ports_env_and_mounts_merge_by_their_keys() {
        let original = json!({"spec": {"containers": [{
            "name": "app",
            "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 9090, "name": "metrics"}],
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}]
        }]}});
        let patch = json!({"spec": {"containers": [{
            "name": "app",
            "ports": [{"containerPort": 8080.0, "protocol": "TCP"}],
            "env": [{"name": "B", "value": "3"}, {"name": "A", "$patch": "delete"}],
            "volumeMounts": [{"mountPath": "/tmp", "readOnly": true}]
        }]}});
        let result = patched("Pod", original, patch);
        let container = &result["spec"]["containers"][0];
        assert_eq!(
            container["ports"],
            json!([
                // The key matched by value; the patch's spelling of it wins.
                {"containerPort": 8080.0, "name": "http", "protocol": "TCP"},
                {"containerPort": 9090, "name": "metrics"}
            ])
        );
        assert_eq!(container["env"], json!([{"name": "B", "value": "3"}]));
        assert_eq!(
            container["volumeMounts"],
            json!([
                {"name": "data", "mountPath": "/data"},
                {"name": "tmp", "mountPath": "/tmp", "readOnly": true}
            ])
        );
    }

    #[test]
    fn null_inside_a_merged_element_deletes_that_field() {
        let original = json!({"spec": {"containers": [
            {"name": "app", "image": "x:1", "resources": {"limits": {"cpu": "1"}}}
        ]}});
        let patch = json!({"spec": {"containers": [{"name": "app", "resources": null}]}});
        let result = patched("Pod", original, patch);
        assert_eq!(
            result["spec"]["containers"],
            json!([{"name": "app", "image": "x:1"}])
        );
    }

    #[test]
    fn service_ports_merge_by_port() {
        let original = json!({"spec": {"type": "ClusterIP", "ports": [
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "https", "port": 443, "targetPort": 8443}
        ]}});
        let patch = json!({"spec": {"ports": [{"port": 443, "targetPort": 9443}]}});
        let result = patched("Service", original, patch);
        assert_eq!(
            result["spec"]["ports"],
            json!([
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "https", "port": 443, "targetPort": 9443}
            ])
        );
    }

    #[test]
    fn status_conditions_and_node_addresses_merge_by_type() {
        let pod = json!({"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}
        ]}});
        let result = patched(
            "Pod",
            pod,
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "reason": null}]}}),
        );
        assert_eq!(
            result["status"],
            json!({"phase": "Running", "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True"}
            ]})
        );

        let node = json!({"status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.0.5"},
            {"type": "Hostname", "address": "node-a"}
        ]}});
        let result = patched(
            "Node",
            node,
            json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.6"}]}}),
        );
        assert_eq!(
            result["status"]["addresses"],
            json!([
                {"type": "InternalIP", "address": "10.0.0.6"},
                {"type": "Hostname", "address": "node-a"}
            ])
        );
    }

    #[test]
    fn owner_references_merge_by_uid_and_image_pull_secrets_by_name() {
        let original = json!({
            "metadata": {"ownerReferences": [{"uid": "u1", "kind": "ReplicaSet", "name": "rs-1"}]},
            "spec": {"imagePullSecrets": [{"name": "registry"}], "containers": []}
        });
        let patch = json!({
            "metadata": {"ownerReferences": [{"uid": "u1", "controller": true}]},
            "spec": {"imagePullSecrets": [{"name": "mirror"}]}
        });
        let result = patched("Pod", original, patch);
        assert_eq!(
            result["metadata"]["ownerReferences"],
            json!([{"uid": "u1", "kind": "ReplicaSet", "name": "rs-1", "controller": true}])
        );
        assert_eq!(
            result["spec"]["imagePullSecrets"],
            json!([{"name": "mirror"}, {"name": "registry"}])
        );
    }

    #[test]
    fn lists_without_a_merge_strategy_are_replaced() {
        let original = json!({"spec": {
            "containers": [{"name": "app", "args": ["--a", "--b"], "command": ["/bin/app"]}],
            "tolerations": [{"key": "gpu", "operator": "Exists"}]
        }});
        let patch = json!({"spec": {
            "containers": [{"name": "app", "args": ["--c"]}],
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": null}]
        }});
        let result = patched("Pod", original, patch);
        assert_eq!(
            result["spec"],
            json!({
                "containers": [{"name": "app", "args": ["--c"], "command": ["/bin/app"]}],
                "tolerations": [{"key": "spot", "operator": "Exists"}]
            })
        );

        let endpoints =
            json!({"subsets": [{"addresses": [{"ip": "10.1.0.1"}], "ports": [{"port": 80}]}]});
        let result = patched(
            "Endpoints",
            endpoints,
            json!({"subsets": [{"addresses": [{"ip": "10.1.0.2"}]}]}),
        );
        assert_eq!(
            result,
            json!({"subsets": [{"addresses": [{"ip": "10.1.0.2"}]}]})
        );
    }

    #[test]
    fn primitive_merge_lists_are_unioned_without_duplicates() {
        let original = json!({"metadata": {"finalizers": ["a", "b"]}});
        let result = patched(
            "Namespace",
            original.clone(),
            json!({"metadata": {"finalizers": ["b", "c", "c"]}}),
        );
        assert_eq!(result["metadata"]["finalizers"], json!(["a", "b", "c"]));

        // As upstream: values new to the list come ahead of live values the patch does not name.
        let result = patched(
            "Namespace",
            original,
            json!({"metadata": {"finalizers": ["z"]}}),
        );
        assert_eq!(result["metadata"]["finalizers"], json!(["z", "a", "b"]));

        let node = json!({"spec": {"podCIDRs": ["10.244.1.0/24"]}});
        let result = patched(
            "Node",
            node,
            json!({"spec": {"podCIDRs": ["10.244.1.0/24", "fd00::/64"]}}),
        );
        assert_eq!(
            result["spec"]["podCIDRs"],
            json!(["10.244.1.0/24", "fd00::/64"])
        );
    }

    #[test]
    fn delete_from_primitive_list_removes_values() {
        let original = json!({"metadata": {"finalizers": ["a", "b", "c"]}});
        let patch = json!({"metadata": {
            "$setElementOrder/finalizers": ["c", "a", "d"],
            "$deleteFromPrimitiveList/finalizers": ["b"],
            "finalizers": ["d"]
        }});
        let result = patched("Secret", original, patch);
        assert_eq!(result["metadata"]["finalizers"], json!(["c", "a", "d"]));

        let result = patched(
            "Secret",
            json!({"metadata": {"finalizers": ["a", "b"]}}),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a", "x"]}}),
        );
        assert_eq!(result["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn element_order_of_a_primitive_list_interleaves_live_values() {
        let original = json!({"metadata": {"finalizers": ["one", "four", "two"]}});
        let patch = json!({"metadata": {
            "$setElementOrder/finalizers": ["three", "one", "two"],
            "finalizers": ["three"]
        }});
        let result = patched("ConfigMap", original, patch);
        assert_eq!(
            result["metadata"]["finalizers"],
            json!(["three", "one", "four", "two"])
        );
    }

    #[test]
    fn element_order_applies_to_a_list_the_original_lacks() {
        let patch = json!({"spec": {
            "$setElementOrder/ports": [{"port": 443}, {"port": 80}],
            "ports": [{"port": 443, "name": "https"}, {"port": 80, "name": "http"}]
        }});
        let result = patched("Service", json!({"spec": {}}), patch);
        assert_eq!(
            result["spec"]["ports"],
            json!([{"port": 443, "name": "https"}, {"port": 80, "name": "http"}])
        );
    }

    #[test]
    fn patch_replace_in_a_map_replaces_the_map() {
        let original = json!({"spec": {"nodeSelector": {"disk": "hdd", "zone": "a"}}});
        let patch = json!({"spec": {"nodeSelector": {"$patch": "replace", "disk": "ssd"}}});
        let result = patched("Pod", original, patch.clone());
        assert_eq!(result["spec"]["nodeSelector"], json!({"disk": "ssd"}));

        let result = patched("Pod", json!({"spec": {}}), patch);
        assert_eq!(result["spec"]["nodeSelector"], json!({"disk": "ssd"}));

        let result = patched(
            "ConfigMap",
            json!({"data": {"a": "1"}, "kind": "ConfigMap"}),
            json!({"$patch": "replace", "data": {"b": "2"}}),
        );
        assert_eq!(result, json!({"data": {"b": "2"}}));
    }

    #[test]
    fn patch_replace_in_a_list_replaces_the_list() {
        let original = json!({"spec": {"containers": [{"name": "app", "env": [
            {"name": "A", "value": "1"}, {"name": "B", "value": "2"}
        ]}]}});
        let patch = json!({"spec": {"containers": [{"name": "app", "env": [
            {"name": "C", "value": "3"}, {"$patch": "replace"}
        ]}]}});
        let result = patched("Pod", original.clone(), patch);
        assert_eq!(
            result["spec"]["containers"][0]["env"],
            json!([{"name": "C", "value": "3"}])
        );

        let result = patched(
            "Pod",
            original,
            json!({"spec": {"containers": [{"$patch": "replace"}]}}),
        );
        assert_eq!(result["spec"]["containers"], json!([]));
    }

    #[test]
    fn patch_delete_in_a_list_removes_every_element_with_that_key() {
        let original = deployment_with_containers(json!([
            {"name": "app"}, {"name": "debug"}, {"name": "sidecar"}, {"name": "debug"}
        ]));
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "debug", "$patch": "delete"},
            {"name": "not-there", "$patch": "delete"}
        ]}}}});
        let result = patched("Deployment", original, patch);
        assert_eq!(
            names(&result["spec"]["template"]["spec"]["containers"]),
            ["app", "sidecar"]
        );
    }

    #[test]
    fn patch_delete_in_a_map_empties_it_as_upstream_does() {
        let original = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"spec": {"strategy": {"$patch": "delete"}}});
        let result = patched("Deployment", original, patch.clone());
        assert_eq!(result["spec"], json!({"strategy": {}}));

        let result = patched("Deployment", json!({"spec": {"replicas": 1}}), patch);
        assert_eq!(result["spec"], json!({"replicas": 1}));

        let result = patched(
            "Lease",
            json!({"spec": {"holderIdentity": "a"}}),
            json!({"$patch": "delete"}),
        );
        assert_eq!(result, json!({}));
    }

    #[test]
    fn patch_merge_is_the_default() {
        let original = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"containers": [{"name": "app", "image": "x:1"}]}});
        let patch = json!({
            "metadata": {"labels": {"$patch": "merge", "b": "2"}},
            "spec": {"containers": [{"$patch": "merge"}, {"name": "app", "image": "x:2", "$patch": "merge"}]}
        });
        let result = patched("Pod", original, patch);
        assert_eq!(
            result,
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "app", "image": "x:2"}]}})
        );
    }

    #[test]
    fn retain_keys_clears_the_old_deployment_strategy() {
        // kubectl apply switching a Deployment from RollingUpdate to Recreate.
        let original = json!({"spec": {"replicas": 1, "strategy": {
            "type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}
        }}});
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "rollingUpdate": null, "type": "Recreate"}}});
        let result = patched("Deployment", original, patch);
        assert_eq!(
            result["spec"],
            json!({"replicas": 1, "strategy": {"type": "Recreate"}})
        );
        assert!(field_patch_strategy("Deployment", &["spec", "strategy"]).retain_keys);
    }

    #[test]
    fn retain_keys_switches_a_volume_source() {
        let original = json!({"spec": {"volumes": [
            {"name": "data", "hostPath": {"path": "/srv/data", "type": "Directory"}},
            {"name": "config", "configMap": {"name": "settings"}}
        ]}});
        let patch = json!({"spec": {
            "$setElementOrder/volumes": [{"name": "data"}, {"name": "config"}],
            "volumes": [{"$retainKeys": ["emptyDir", "name"], "emptyDir": {"medium": "Memory"}, "name": "data"}]
        }});
        let result = patched("Pod", original, patch);
        assert_eq!(
            result["spec"]["volumes"],
            json!([
                {"name": "data", "emptyDir": {"medium": "Memory"}},
                {"name": "config", "configMap": {"name": "settings"}}
            ])
        );
    }

    #[test]
    fn retain_keys_rejects_a_field_it_does_not_list() {
        let error = patch_error(
            "Deployment",
            json!({"spec": {"strategy": {"type": "RollingUpdate"}}}),
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2}}}}),
        );
        assert_eq!(
            error,
            "spec.strategy: the patch sets field rollingUpdate that $retainKeys does not list"
        );
        let error = patch_error(
            "Deployment",
            json!({}),
            json!({"spec": {"strategy": {"$retainKeys": "type"}}}),
        );
        assert_eq!(
            error,
            "spec.strategy: $retainKeys must be a list, not a string"
        );
    }

    #[test]
    fn malformed_directives_are_errors_naming_the_field() {
        let deployment = two_container_deployment();
        let cases = [
            (
                json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "$patch": "bogus"}]}}}}),
                "spec.template.spec.containers[0]: unknown $patch directive \"bogus\"; expected replace, merge or delete",
            ),
            (
                json!({"metadata": {"labels": {"$patch": 1}}}),
                "metadata.labels: unknown $patch directive \"1\"; expected replace, merge or delete",
            ),
            (
                json!({"spec": {"template": {"spec": {"containers": [{"name": "app"}, {"image": "x:3"}]}}}}),
                "spec.template.spec.containers[1]: patch element has no merge key name",
            ),
            (
                json!({"spec": {"template": {"spec": {"containers": [{"$patch": "delete", "image": "x"}]}}}}),
                "spec.template.spec.containers[0]: patch element has no merge key name",
            ),
            (
                json!({"spec": {"template": {"spec": {"$setElementOrder/containers": {"name": "app"}}}}}),
                "spec.template.spec.containers: $setElementOrder/containers must be a list, not an object",
            ),
            (
                json!({"spec": {"template": {"spec": {"$setElementOrder/containers": ["app"]}}}}),
                "spec.template.spec.$setElementOrder/containers[0]: $setElementOrder element has no merge key name",
            ),
            (
                json!({"spec": {"template": {"spec": {
                    "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                    "containers": [{"name": "sidecar"}, {"name": "app"}]
                }}}}),
                "spec.template.spec.containers: the order of the elements in the patch does not match $setElementOrder/containers",
            ),
            (
                json!({"spec": {"template": {"spec": {"$setElementOrder": []}}}}),
                "spec.template.spec: directive key $setElementOrder must have the form $setElementOrder/<field>",
            ),
            (
                json!({"metadata": {"$deleteFromPrimitiveList/finalizers": "a"}}),
                "metadata.finalizers: $deleteFromPrimitiveList/finalizers must be a list, not a string",
            ),
            (
                json!({"spec": {"template": {"spec": {"containers": ["app"]}}}}),
                "spec.template.spec.containers: list elements are not all of one type",
            ),
            (
                json!({"metadata": {"finalizers": [{"name": "a"}]}}),
                "metadata.finalizers: list of objects has no merge key, so it can't be merged",
            ),
        ];
        for (patch, message) in cases {
            let original = if message.starts_with("metadata.finalizers: list") {
                json!({"metadata": {"finalizers": []}})
            } else {
                deployment.clone()
            };
            assert_eq!(patch_error("Deployment", original, patch), message);
        }
    }

    #[test]
    fn unknown_kinds_merge_like_a_json_merge_patch() {
        let original = json!({"kind": "Widget", "metadata": {"finalizers": ["a"]}, "spec": {
            "size": 1, "containers": [{"name": "a", "image": "x"}], "options": {"fast": true}
        }});
        let patch = json!({"metadata": {"finalizers": ["b"]}, "spec": {
            "containers": [{"name": "b"}], "options": {"fast": null, "safe": true}
        }});
        let result = patched("Widget", original, patch);
        assert_eq!(
            result,
            json!({"kind": "Widget", "metadata": {"finalizers": ["b"]}, "spec": {
                "size": 1, "containers": [{"name": "b"}], "options": {"safe": true}
            }})
        );
        assert_eq!(
            field_patch_strategy("Widget", &["metadata", "finalizers"]),
            FieldPatchStrategy::default()
        );
    }

    #[test]
    fn a_value_of_another_type_replaces_the_live_value() {
        let original = json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
        let patch = json!({"spec": {"selector": "none", "ports": {"port": 81}}});
        let result = patched("Service", original, patch);
        assert_eq!(
            result["spec"],
            json!({"selector": "none", "ports": {"port": 81}})
        );
    }

    #[test]
    fn directive_keys_never_reach_the_result() {
        // Directives inside values that have nothing to merge into: a new container, a new
        // field, and the elements of a replaced list.
        let patch = json!({"spec": {"template": {"spec": {
            "containers": [{
                "name": "new",
                "$setElementOrder/env": [{"name": "B"}, {"name": "A"}],
                "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}, {"name": "C", "$patch": "delete"}],
                "resources": {"$patch": "replace", "limits": {"cpu": "1"}}
            }],
            "affinity": {"$retainKeys": ["nodeAffinity"], "nodeAffinity": {"x": 1}},
            "tolerations": [{"key": "a", "$patch": "replace"}, {"key": "b", "extra": {"$patch": "delete"}}]
        }}}});
        let result = patched("Deployment", two_container_deployment(), patch);
        let spec = &result["spec"]["template"]["spec"];
        assert_eq!(
            spec["containers"][0],
            json!({"name": "new", "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}], "resources": {"limits": {"cpu": "1"}}})
        );
        assert_eq!(spec["affinity"], json!({"nodeAffinity": {"x": 1}}));
        assert_eq!(spec["tolerations"], json!([{"key": "b"}]));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(values_equal(&json!(8080), &json!(8080.0)));
        assert!(!values_equal(&json!(8080), &json!("8080")));
        assert!(values_equal(&json!({"a": [1]}), &json!({"a": [1.0]})));
    }

    #[test]
    fn the_table_covers_the_tagged_fields_of_every_served_kind() {
        let merged_by = |kind: &str, path: &[&str], key: &str| {
            let strategy = field_patch_strategy(kind, path);
            assert!(strategy.merge, "{kind} {path:?} should merge");
            assert_eq!(strategy.merge_key, Some(key), "{kind} {path:?}");
        };
        for kind in [
            "Namespace",
            "Pod",
            "Service",
            "Endpoints",
            "Node",
            "Event",
            "ConfigMap",
            "Secret",
            "ServiceAccount",
            "Deployment",
            "ReplicaSet",
            "DaemonSet",
            "EndpointSlice",
            "Lease",
        ] {
            merged_by(kind, &["metadata", "ownerReferences"], "uid");
            let finalizers = field_patch_strategy(kind, &["metadata", "finalizers"]);
            assert!(finalizers.merge && finalizers.merge_key.is_none(), "{kind}");
        }
        for (kind, prefix) in [
            ("Pod", &["spec"][..]),
            ("Deployment", &["spec", "template", "spec"][..]),
            ("ReplicaSet", &["spec", "template", "spec"][..]),
            ("DaemonSet", &["spec", "template", "spec"][..]),
        ] {
            let at = |rest: &[&'static str]| [prefix, rest].concat();
            for containers in ["containers", "initContainers", "ephemeralContainers"] {
                merged_by(kind, &at(&[containers]), "name");
                merged_by(kind, &at(&[containers, "ports"]), "containerPort");
                merged_by(kind, &at(&[containers, "env"]), "name");
                merged_by(kind, &at(&[containers, "volumeMounts"]), "mountPath");
                merged_by(kind, &at(&[containers, "volumeDevices"]), "devicePath");
            }
            merged_by(kind, &at(&["volumes"]), "name");
            assert!(field_patch_strategy(kind, &at(&["volumes"])).retain_keys);
            merged_by(kind, &at(&["imagePullSecrets"]), "name");
            merged_by(kind, &at(&["hostAliases"]), "ip");
            merged_by(kind, &at(&["topologySpreadConstraints"]), "topologyKey");
            merged_by(kind, &at(&["schedulingGates"]), "name");
            merged_by(kind, &at(&["resourceClaims"]), "name");
            assert!(!field_patch_strategy(kind, &at(&["tolerations"])).merge);
        }
        merged_by("Pod", &["status", "conditions"], "type");
        merged_by("Pod", &["status", "podIPs"], "ip");
        merged_by("Pod", &["status", "hostIPs"], "ip");
        merged_by("Pod", &["status", "resourceClaimStatuses"], "name");
        assert!(!field_patch_strategy("Pod", &["status", "containerStatuses"]).merge);
        for kind in [
            "Namespace",
            "Service",
            "Node",
            "Deployment",
            "ReplicaSet",
            "DaemonSet",
        ] {
            merged_by(kind, &["status", "conditions"], "type");
        }
        merged_by("Service", &["spec", "ports"], "port");
        merged_by("Node", &["status", "addresses"], "type");
        assert!(field_patch_strategy("Node", &["spec", "podCIDRs"]).merge);
        merged_by("ServiceAccount", &["secrets"], "name");
        assert!(!field_patch_strategy("ServiceAccount", &["imagePullSecrets"]).merge);
        assert!(!field_patch_strategy("Endpoints", &["subsets"]).merge);
        assert!(!field_patch_strategy("EndpointSlice", &["endpoints"]).merge);
        assert!(!field_patch_strategy("DaemonSet", &["spec", "updateStrategy"]).retain_keys);
    }
}
