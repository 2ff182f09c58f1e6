//! Field validation of the built-in kinds: the 422 causes kube-apiserver gives for an object it will not store.
//!
//! The rules follow `pkg/apis/core/validation`, `pkg/apis/apps/validation` and apimachinery's
//! name and label checks, as of the Kubernetes version skiff reports. Objects arrive already
//! structurally decoded and defaulted, so a field of the wrong JSON type reads here as absent.

use serde_json::{Map, Value};

/// One reason an object is invalid: an entry of a 422 Status's `details.causes`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldCause {
    /// A `metav1.CauseType`, such as `FieldValueRequired`.
    pub reason: &'static str,
    /// The path of the offending field, as `spec.containers[0].image`.
    pub field: String,
    /// The message without the field, as `Required value`.
    pub message: String,
}

/// The reasons `object`, of `kind`, may not be stored; empty when it may. `old` is the stored
/// object on update and `None` on create.
pub fn validate(kind: &str, object: &Value, old: Option<&Value>) -> Vec<FieldCause> {
    let mut causes = Vec::new();
    validate_object_meta(kind, &object["metadata"], &mut causes);
    match kind {
        "Pod" => {
            validate_pod_spec(&object["spec"], "spec", &mut causes);
            if let Some(old) = old {
                validate_pod_update(object, old, &mut causes);
            }
        }
        "Service" => validate_service(object, old, &mut causes),
        "Deployment" | "ReplicaSet" | "DaemonSet" => {
            validate_workload(kind, object, old, &mut causes)
        }
        "Job" => validate_job(object, old, &mut causes),
        "ConfigMap" => validate_config_map(object, old, &mut causes),
        "Secret" => validate_secret(object, old, &mut causes),
        "Lease" => validate_lease(object, &mut causes),
        "EndpointSlice" => validate_endpoint_slice(object, old, &mut causes),
        // Namespaces, Endpoints, Nodes, Events, ServiceAccounts and unknown kinds are checked
        // for their metadata only.
        _ => {}
    }
    causes
}

// Cause constructors. Each builds the message as `field.Error.ErrorBody` does: the error type's
// words, the offending value when the type shows one, and the detail. Values are passed in
// already rendered as Go prints them (see `go_quote` and friends).

fn required(field: impl Into<String>, detail: &str) -> FieldCause {
    FieldCause {
        reason: "FieldValueRequired",
        field: field.into(),
        message: with_detail("Required value".to_string(), detail),
    }
}

fn invalid(field: impl Into<String>, shown_value: &str, detail: &str) -> FieldCause {
    FieldCause {
        reason: "FieldValueInvalid",
        field: field.into(),
        message: with_detail(format!("Invalid value: {shown_value}"), detail),
    }
}

fn not_supported(field: impl Into<String>, shown_value: &str, supported: &[&str]) -> FieldCause {
    let quoted: Vec<String> = supported.iter().map(|value| go_quote(value)).collect();
    FieldCause {
        reason: "FieldValueNotSupported",
        field: field.into(),
        message: format!(
            "Unsupported value: {shown_value}: supported values: {}",
            quoted.join(", ")
        ),
    }
}

fn duplicate(field: impl Into<String>, shown_value: &str) -> FieldCause {
    FieldCause {
        reason: "FieldValueDuplicate",
        field: field.into(),
        message: format!("Duplicate value: {shown_value}"),
    }
}

fn not_found(field: impl Into<String>, shown_value: &str) -> FieldCause {
    FieldCause {
        reason: "FieldValueNotFound",
        field: field.into(),
        message: format!("Not found: {shown_value}"),
    }
}

fn forbidden(field: impl Into<String>, detail: &str) -> FieldCause {
    FieldCause {
        reason: "FieldValueForbidden",
        field: field.into(),
        message: with_detail("Forbidden".to_string(), detail),
    }
}

/// A size limit exceeded; upstream never shows the value, which may be megabytes long.
fn too_long(field: impl Into<String>, max_bytes: usize) -> FieldCause {
    FieldCause {
        reason: "FieldValueTooLong",
        field: field.into(),
        message: format!("Too long: must have at most {max_bytes} bytes"),
    }
}

fn with_detail(mut message: String, detail: &str) -> String {
    if !detail.is_empty() {
        message.push_str(": ");
        message.push_str(detail);
    }
    message
}

/// Adds one `Invalid value` cause per message a name checker returned.
fn push_invalid_each(
    causes: &mut Vec<FieldCause>,
    field: &str,
    shown_value: &str,
    messages: Vec<String>,
) {
    for message in messages {
        causes.push(invalid(field, shown_value, &message));
    }
}

// How Go prints values in messages: `%q` for strings, `%#v` for maps and structs.

/// A string as Go's `%q` prints it.
fn go_quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for character in text.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                quoted.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// A JSON value shown as Go shows a field's value: numbers and booleans bare, strings quoted.
fn go_scalar(value: &Value) -> String {
    match value {
        Value::String(text) => go_quote(text),
        Value::Null => "null".to_string(),
        other => other.to_string(),
    }
}

/// A `map[string]string` as `%#v` prints it: keys sorted, `(nil)` when absent.
fn go_string_map(map: &Value) -> String {
    let Some(map) = map.as_object() else {
        return "map[string]string(nil)".to_string();
    };
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let shown: Vec<String> = entries
        .into_iter()
        .map(|(key, value)| {
            format!(
                "{}:{}",
                go_quote(key),
                go_quote(value.as_str().unwrap_or(""))
            )
        })
        .collect();
    format!("map[string]string{{{}}}", shown.join(", "))
}

/// A `[]string` as `%#v` prints it.
fn go_string_slice(list: &Value) -> String {
    match list.as_array() {
        None => "[]string(nil)".to_string(),
        Some(items) => {
            let shown: Vec<String> = items
                .iter()
                .map(|item| go_quote(item.as_str().unwrap_or("")))
                .collect();
            format!("[]string{{{}}}", shown.join(", "))
        }
    }
}

// Name checkers. Each returns upstream's messages for a value, empty when the value is valid,
// and is written at the character level so that one function serves every field it applies to.

const DNS1123_LABEL_MAX_LENGTH: usize = 63;
const DNS1123_SUBDOMAIN_MAX_LENGTH: usize = 253;
const LABEL_MAX_LENGTH: usize = 63;
const PORT_NAME_MAX_LENGTH: usize = 15;

const DNS1123_LABEL_FORMAT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN_FORMAT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1035_LABEL_FORMAT: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";
const LABEL_KEY_NAME_FORMAT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const LABEL_VALUE_FORMAT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const ENV_VAR_NAME_FORMAT: &str = "[-._a-zA-Z][-._a-zA-Z0-9]*";
const CONFIG_MAP_KEY_FORMAT: &str = "[-._a-zA-Z0-9]+";

fn max_length_message(max: usize) -> String {
    format!("must be no more than {max} characters")
}

/// apimachinery's `RegexError`: the rule in words, examples, and the regular expression.
fn format_message(rule: &str, format: &str, examples: &[&str]) -> String {
    let examples: Vec<String> = examples
        .iter()
        .map(|example| format!("'{example}'"))
        .collect();
    format!(
        "{rule} (e.g. {}, regex used for validation is '{format}')",
        examples.join(" or ")
    )
}

fn is_lower_alphanumeric(character: char) -> bool {
    character.is_ascii_lowercase() || character.is_ascii_digit()
}

/// Whether `text` is one or more characters that `inner` accepts, starting and ending with
/// characters that `edge` accepts.
fn matches_edged(text: &str, edge: fn(char) -> bool, inner: fn(char) -> bool) -> bool {
    let (Some(first), Some(last)) = (text.chars().next(), text.chars().last()) else {
        return false;
    };
    edge(first) && edge(last) && text.chars().all(inner)
}

fn is_dns1123_label(text: &str) -> bool {
    matches_edged(text, is_lower_alphanumeric, |c| {
        is_lower_alphanumeric(c) || c == '-'
    })
}

fn is_dns1123_subdomain(text: &str) -> bool {
    text.split('.').all(is_dns1123_label)
}

fn dns1123_label_errors(text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if text.len() > DNS1123_LABEL_MAX_LENGTH {
        errors.push(max_length_message(DNS1123_LABEL_MAX_LENGTH));
    }
    if !is_dns1123_label(text) {
        if is_dns1123_subdomain(text) {
            errors.push("must not contain dots".to_string());
        } else {
            errors.push(format_message(
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                DNS1123_LABEL_FORMAT,
                &["my-name", "123-abc"],
            ));
        }
    }
    errors
}

fn dns1123_subdomain_errors(text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if text.len() > DNS1123_SUBDOMAIN_MAX_LENGTH {
        errors.push(max_length_message(DNS1123_SUBDOMAIN_MAX_LENGTH));
    }
    if !is_dns1123_subdomain(text) {
        errors.push(format_message(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            DNS1123_SUBDOMAIN_FORMAT,
            &["example.com"],
        ));
    }
    errors
}

fn dns1035_label_errors(text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if text.len() > DNS1123_LABEL_MAX_LENGTH {
        errors.push(max_length_message(DNS1123_LABEL_MAX_LENGTH));
    }
    let starts_with_letter = text.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if !(starts_with_letter && is_dns1123_label(text)) {
        errors.push(format_message(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
            DNS1035_LABEL_FORMAT,
            &["my-name", "abc-123"],
        ));
    }
    errors
}

/// The name part of a label key, and a non-empty label value: alphanumeric at both ends,
/// with '-', '_' and '.' allowed inside.
fn is_label_token(text: &str) -> bool {
    matches_edged(
        text,
        |c| c.is_ascii_alphanumeric(),
        |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'),
    )
}

/// apimachinery's `IsQualifiedName`: label keys, annotation keys and selector keys.
fn qualified_name_errors(text: &str) -> Vec<String> {
    const RULE: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
    const EXAMPLES: [&str; 3] = ["MyName", "my.name", "123-abc"];
    let mut errors = Vec::new();
    let parts: Vec<&str> = text.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_string());
            } else {
                errors.extend(
                    dns1123_subdomain_errors(prefix)
                        .into_iter()
                        .map(|message| format!("prefix part {message}")),
                );
            }
            *name
        }
        _ => {
            return vec![format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                format_message(RULE, LABEL_KEY_NAME_FORMAT, &EXAMPLES)
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_string());
    } else if name.len() > LABEL_MAX_LENGTH {
        errors.push(format!(
            "name part {}",
            max_length_message(LABEL_MAX_LENGTH)
        ));
    }
    if !is_label_token(name) {
        errors.push(format!(
            "name part {}",
            format_message(RULE, LABEL_KEY_NAME_FORMAT, &EXAMPLES)
        ));
    }
    errors
}

fn label_value_errors(text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if text.len() > LABEL_MAX_LENGTH {
        errors.push(max_length_message(LABEL_MAX_LENGTH));
    }
    if !text.is_empty() && !is_label_token(text) {
        errors.push(format_message(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            LABEL_VALUE_FORMAT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    errors
}

/// An IANA service name, as container port names and named target ports must be.
fn port_name_errors(text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if text.len() > PORT_NAME_MAX_LENGTH {
        errors.push(max_length_message(PORT_NAME_MAX_LENGTH));
    }
    if text.is_empty() || !text.chars().all(|c| is_lower_alphanumeric(c) || c == '-') {
        errors.push(
            "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".to_string(),
        );
    }
    if !text.chars().any(|c| c.is_ascii_lowercase()) {
        errors.push("must contain at least one letter (a-z)".to_string());
    }
    if text.contains("--") {
        errors.push("must not contain consecutive hyphens".to_string());
    }
    if text.starts_with('-') || text.ends_with('-') {
        errors.push("must not begin or end with a hyphen".to_string());
    }
    errors
}

/// Names that would make a path climb out of a directory, refused for keys that become file
/// names in volumes.
fn relative_path_errors(text: &str) -> Option<String> {
    match text {
        "." => Some("must not be '.'".to_string()),
        ".." => Some("must not be '..'".to_string()),
        _ if text.starts_with("..") => Some("must not start with '..'".to_string()),
        _ => None,
    }
}

fn env_var_name_errors(text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let valid_start = text
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || matches!(c, '-' | '.' | '_'));
    let valid_rest = text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !(valid_start && valid_rest) {
        errors.push(format_message(
            "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit",
            ENV_VAR_NAME_FORMAT,
            &["my.env-name", "MY_ENV.NAME", "MyEnvName1"],
        ));
    }
    errors.extend(relative_path_errors(text));
    errors
}

/// A key of a ConfigMap's or Secret's data.
fn config_map_key_errors(text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if text.len() > DNS1123_SUBDOMAIN_MAX_LENGTH {
        errors.push(max_length_message(DNS1123_SUBDOMAIN_MAX_LENGTH));
    }
    if text.is_empty()
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        errors.push(format_message(
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            CONFIG_MAP_KEY_FORMAT,
            &["key.name", "KEY_NAME", "key-name"],
        ));
    }
    errors.extend(relative_path_errors(text));
    errors
}

// Object metadata.

/// The most a single object's annotations may hold, keys and values together.
const TOTAL_ANNOTATION_SIZE_LIMIT_BYTES: usize = 256 * 1024;

/// Kinds whose objects live outside any namespace.
fn is_cluster_scoped(kind: &str) -> bool {
    matches!(kind, "Namespace" | "Node")
}

/// The checker for an object name of `kind`: most kinds take DNS subdomains; namespaces become
/// DNS labels and Service names become DNS-1035 labels in cluster DNS names.
fn object_name_errors(kind: &str, name: &str) -> Vec<String> {
    match kind {
        "Namespace" => dns1123_label_errors(name),
        "Service" => dns1035_label_errors(name),
        _ => dns1123_subdomain_errors(name),
    }
}

fn validate_object_meta(kind: &str, metadata: &Value, causes: &mut Vec<FieldCause>) {
    let generate_name = metadata["generateName"].as_str().unwrap_or("");
    if !generate_name.is_empty() {
        // A generated name gets random characters after the prefix, so a trailing '-' is fine.
        let masked = match generate_name.strip_suffix('-') {
            Some(stem) if !stem.is_empty() => format!("{stem}a"),
            _ => generate_name.to_string(),
        };
        let errors = object_name_errors(kind, &masked);
        push_invalid_each(
            causes,
            "metadata.generateName",
            &go_quote(generate_name),
            errors,
        );
    }
    let name = metadata["name"].as_str().unwrap_or("");
    if name.is_empty() {
        causes.push(required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        push_invalid_each(
            causes,
            "metadata.name",
            &go_quote(name),
            object_name_errors(kind, name),
        );
    }
    let namespace = metadata["namespace"].as_str().unwrap_or("");
    if is_cluster_scoped(kind) {
        if !namespace.is_empty() {
            causes.push(forbidden("metadata.namespace", "not allowed on this type"));
        }
    } else if !namespace.is_empty() {
        push_invalid_each(
            causes,
            "metadata.namespace",
            &go_quote(namespace),
            dns1123_label_errors(namespace),
        );
    }
    validate_labels(&metadata["labels"], "metadata.labels", causes);
    validate_annotations(&metadata["annotations"], "metadata.annotations", causes);
}

/// Label keys and values, all reported at the map's own path as upstream does.
fn validate_labels(labels: &Value, field: &str, causes: &mut Vec<FieldCause>) {
    for (key, value) in labels.as_object().into_iter().flatten() {
        push_invalid_each(causes, field, &go_quote(key), qualified_name_errors(key));
        let value = value.as_str().unwrap_or("");
        push_invalid_each(causes, field, &go_quote(value), label_value_errors(value));
    }
}

fn validate_annotations(annotations: &Value, field: &str, causes: &mut Vec<FieldCause>) {
    let mut total_size = 0;
    for (key, value) in annotations.as_object().into_iter().flatten() {
        // Annotation keys are compared case-insensitively, so upper case is allowed.
        push_invalid_each(
            causes,
            field,
            &go_quote(key),
            qualified_name_errors(&key.to_lowercase()),
        );
        total_size += key.len() + value.as_str().map_or(0, str::len);
    }
    if total_size > TOTAL_ANNOTATION_SIZE_LIMIT_BYTES {
        causes.push(too_long(field, TOTAL_ANNOTATION_SIZE_LIMIT_BYTES));
    }
}

// Small readers of decoded JSON, where a missing field and a field of another type read alike.

/// The string at `value`, or `""` when there is none, as Go reads an unset string field.
fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

/// The elements of the array at `value`, or none.
fn elements(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

/// The entries of the object at `value`, or none.
fn entries(value: &Value) -> impl Iterator<Item = (&String, &Value)> {
    value.as_object().into_iter().flatten()
}

/// Checks a field that takes one of a fixed set of values and may not be empty.
fn validate_enum(value: &Value, field: &str, supported: &[&str], causes: &mut Vec<FieldCause>) {
    let value = text(value);
    if value.is_empty() {
        causes.push(required(field, ""));
    } else if !supported.contains(&value) {
        causes.push(not_supported(field, &go_quote(value), supported));
    }
}

const PORT_RANGE_MESSAGE: &str = "must be between 1 and 65535, inclusive";
const NEGATIVE_MESSAGE: &str = "must be greater than or equal to 0";
const FIELD_IMMUTABLE_MESSAGE: &str = "field is immutable";

/// Checks that an optional integer field is not negative.
fn validate_non_negative(value: &Value, field: &str, causes: &mut Vec<FieldCause>) {
    if let Some(number) = value.as_i64().filter(|number| *number < 0) {
        causes.push(invalid(field, &number.to_string(), NEGATIVE_MESSAGE));
    }
}

fn is_valid_port_number(port: i64) -> bool {
    (1..=65535).contains(&port)
}

// Resource quantities, compared exactly as `resource.Quantity` does.

/// How a quantity was written, which decides how it is printed back.
#[derive(Debug, Clone, Copy, PartialEq)]
enum QuantityFormat {
    DecimalSi,
    BinarySi,
    DecimalExponent,
}

/// A parsed quantity. Kubernetes keeps quantities to nano precision, so an integer count of
/// billionths holds every value exactly and compares by plain integer comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Quantity {
    nanos: i128,
    format: QuantityFormat,
}

const NANOS_PER_UNIT: i128 = 1_000_000_000;
const QUANTITY_FORMAT_MESSAGE: &str =
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";
const QUANTITY_SUFFIX_MESSAGE: &str = "unable to parse quantity's suffix";
const BINARY_SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// Reads a quantity as `resource.ParseQuantity` does, rounding finer than nano precision up.
fn parse_quantity(quantity: &str) -> Result<Quantity, &'static str> {
    let bytes = quantity.as_bytes();
    let take_digits = |mut position: usize| {
        while position < bytes.len() && bytes[position].is_ascii_digit() {
            position += 1;
        }
        position
    };
    let negative = bytes.first() == Some(&b'-');
    let whole_start = usize::from(matches!(bytes.first(), Some(b'-' | b'+')));
    let whole_end = take_digits(whole_start);
    let (fraction_start, fraction_end) = if bytes.get(whole_end) == Some(&b'.') {
        (whole_end + 1, take_digits(whole_end + 1))
    } else {
        (whole_end, whole_end)
    };
    if whole_end == whole_start && fraction_end == fraction_start {
        return Err(QUANTITY_FORMAT_MESSAGE);
    }
    let suffix_start = fraction_end;
    let mut position = suffix_start;
    while position < bytes.len() && b"eEinumkKMGTP".contains(&bytes[position]) {
        position += 1;
    }
    if matches!(bytes.get(position), Some(b'-' | b'+')) {
        position += 1;
    }
    if take_digits(position) != bytes.len() {
        return Err(QUANTITY_FORMAT_MESSAGE);
    }
    let suffix = &quantity[suffix_start..];
    let (binary_power, decimal_power, format) = match suffix {
        "" => (0, 0, QuantityFormat::DecimalSi),
        "n" => (0, -9, QuantityFormat::DecimalSi),
        "u" => (0, -6, QuantityFormat::DecimalSi),
        "m" => (0, -3, QuantityFormat::DecimalSi),
        "k" => (0, 3, QuantityFormat::DecimalSi),
        "M" => (0, 6, QuantityFormat::DecimalSi),
        "G" => (0, 9, QuantityFormat::DecimalSi),
        "T" => (0, 12, QuantityFormat::DecimalSi),
        "P" => (0, 15, QuantityFormat::DecimalSi),
        "E" => (0, 18, QuantityFormat::DecimalSi),
        _ => match BINARY_SUFFIXES.iter().position(|binary| *binary == suffix) {
            Some(index) => (10 * index as u32, 0, QuantityFormat::BinarySi),
            None => {
                let exponent = suffix
                    .strip_prefix(['e', 'E'])
                    .and_then(|exponent| exponent.parse::<i32>().ok())
                    .ok_or(QUANTITY_SUFFIX_MESSAGE)?;
                (0, exponent, QuantityFormat::DecimalExponent)
            }
        },
    };
    let digits = quantity[whole_start..whole_end]
        .chars()
        .chain(quantity[fraction_start..fraction_end].chars());
    let fraction_length = (fraction_end - fraction_start) as i32;
    let magnitude =
        exact_nanos(digits, binary_power, decimal_power - fraction_length + 9).unwrap_or(i128::MAX);
    Ok(Quantity {
        nanos: if negative { -magnitude } else { magnitude },
        format,
    })
}

/// The digits times 2^`binary_power` times 10^`decimal_power`, rounded up to a whole number;
/// `None` past what i128 holds, which no real resource amount reaches.
fn exact_nanos(
    digits: impl Iterator<Item = char>,
    binary_power: u32,
    decimal_power: i32,
) -> Option<i128> {
    let mut mantissa: i128 = 0;
    for digit in digits {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(i128::from(digit as u8 - b'0'))?;
    }
    mantissa = mantissa.checked_mul(1i128.checked_shl(binary_power)?)?;
    if decimal_power >= 0 {
        return mantissa.checked_mul(10i128.checked_pow(decimal_power as u32)?);
    }
    match 10i128.checked_pow(decimal_power.unsigned_abs()) {
        Some(divisor) => Some((mantissa + divisor - 1) / divisor),
        // Dividing by more than i128 holds leaves only the rounding up of a non-zero amount.
        None => Some(i128::from(mantissa > 0)),
    }
}

impl Quantity {
    /// The quantity as `Quantity.String` prints it: in the format it was written in, with the
    /// largest suffix that keeps the number whole (`1000m` is `1`, `1024Mi` is `1Gi`).
    fn canonical(&self) -> String {
        let sign = if self.nanos < 0 { "-" } else { "" };
        let magnitude = self.nanos.unsigned_abs();
        let nanos_per_unit = NANOS_PER_UNIT as u128;
        // Binary suffixes only print whole numbers of at least 1Ki; anything else is decimal.
        let binary = self.format == QuantityFormat::BinarySi
            && magnitude.is_multiple_of(nanos_per_unit)
            && magnitude >= 1024 * nanos_per_unit;
        if binary {
            let mut number = magnitude / nanos_per_unit;
            let mut power = 0;
            while power + 1 < BINARY_SUFFIXES.len() && number.is_multiple_of(1024) {
                number /= 1024;
                power += 1;
            }
            return format!("{sign}{number}{}", BINARY_SUFFIXES[power]);
        }
        if magnitude == 0 {
            return "0".to_string();
        }
        let mut mantissa = magnitude;
        let mut exponent: i32 = -9;
        while mantissa.is_multiple_of(10) {
            mantissa /= 10;
            exponent += 1;
        }
        let shift = exponent.rem_euclid(3);
        mantissa *= 10u128.pow(shift as u32);
        exponent -= shift;
        let suffix = match (self.format, exponent) {
            (QuantityFormat::DecimalExponent, 0) => String::new(),
            (QuantityFormat::DecimalExponent, _) => format!("e{exponent}"),
            (_, -9) => "n".to_string(),
            (_, -6) => "u".to_string(),
            (_, -3) => "m".to_string(),
            (_, 0) => String::new(),
            (_, 3) => "k".to_string(),
            (_, 6) => "M".to_string(),
            (_, 9) => "G".to_string(),
            (_, 12) => "T".to_string(),
            (_, 15) => "P".to_string(),
            (_, 18) => "E".to_string(),
            _ => format!("e{exponent}"),
        };
        format!("{sign}{mantissa}{suffix}")
    }
}

/// Reads and checks the quantity at `field`, which JSON may give as a string or a number.
fn validate_quantity(value: &Value, field: &str, causes: &mut Vec<FieldCause>) -> Option<Quantity> {
    let written = match value {
        Value::Number(number) => number.to_string(),
        other => text(other).to_string(),
    };
    match parse_quantity(&written) {
        Err(message) => {
            causes.push(invalid(field, &go_quote(&written), message));
            None
        }
        Ok(quantity) => {
            if quantity.nanos < 0 {
                causes.push(invalid(
                    field,
                    &go_quote(&quantity.canonical()),
                    NEGATIVE_MESSAGE,
                ));
            }
            Some(quantity)
        }
    }
}

/// Whether a container may request less of a resource than its limit. Hugepages and extended
/// resources (a domain-prefixed name outside `kubernetes.io/`) cannot be overcommitted.
fn is_overcommit_allowed(resource: &str) -> bool {
    let native = !resource.contains('/') || resource.contains("kubernetes.io/");
    native && !resource.starts_with("hugepages-")
}

fn validate_resources(resources: &Value, path: &str, causes: &mut Vec<FieldCause>) {
    let mut limits = Vec::new();
    for (resource, value) in entries(&resources["limits"]) {
        if let Some(limit) = validate_quantity(value, &format!("{path}.limits[{resource}]"), causes)
        {
            limits.push((resource, limit));
        }
    }
    for (resource, value) in entries(&resources["requests"]) {
        let Some(request) =
            validate_quantity(value, &format!("{path}.requests[{resource}]"), causes)
        else {
            continue;
        };
        let Some((_, limit)) = limits.iter().find(|(name, _)| *name == resource) else {
            continue;
        };
        let shown_request = go_quote(&request.canonical());
        let requests_path = format!("{path}.requests");
        if request.nanos != limit.nanos && !is_overcommit_allowed(resource) {
            let detail = format!("must be equal to {resource} limit of {}", limit.canonical());
            causes.push(invalid(requests_path, &shown_request, &detail));
        } else if request.nanos > limit.nanos {
            let detail = format!(
                "must be less than or equal to {resource} limit of {}",
                limit.canonical()
            );
            causes.push(invalid(requests_path, &shown_request, &detail));
        }
    }
}

// Pod specs, shared by Pods and the pod templates of workloads.

const PORT_PROTOCOLS: [&str; 3] = ["SCTP", "TCP", "UDP"];
const RESTART_POLICIES: [&str; 3] = ["Always", "OnFailure", "Never"];
const DNS_POLICIES: [&str; 4] = ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
const PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];

/// Checks a pod spec found at `path` (`spec` in a Pod, `spec.template.spec` in a workload).
fn validate_pod_spec(spec: &Value, path: &str, causes: &mut Vec<FieldCause>) {
    let volume_names = validate_volumes(&spec["volumes"], &format!("{path}.volumes"), causes);
    // Container names must be unique across regular and init containers, as both are addressed
    // by name in logs, exec and status.
    let mut container_names = std::collections::HashSet::new();
    let containers_path = format!("{path}.containers");
    if spec["containers"].as_array().is_none_or(Vec::is_empty) {
        causes.push(required(&containers_path, ""));
    }
    for (index, container) in elements(&spec["containers"]).enumerate() {
        let container_path = format!("{containers_path}[{index}]");
        validate_container(container, &container_path, &volume_names, causes);
        if !container["restartPolicy"].is_null() {
            causes.push(forbidden(
                format!("{container_path}.restartPolicy"),
                "may not be set for non-init containers",
            ));
        }
        let name = text(&container["name"]);
        if !container_names.insert(name) {
            causes.push(duplicate(format!("{container_path}.name"), &go_quote(name)));
        }
    }
    for (index, container) in elements(&spec["initContainers"]).enumerate() {
        let container_path = format!("{path}.initContainers[{index}]");
        validate_container(container, &container_path, &volume_names, causes);
        validate_init_container_restart(container, &container_path, causes);
        let name = text(&container["name"]);
        if container_names.contains(name) {
            causes.push(duplicate(format!("{container_path}.name"), &go_quote(name)));
        } else if !name.is_empty() {
            container_names.insert(name);
        }
    }
    validate_enum(
        &spec["restartPolicy"],
        &format!("{path}.restartPolicy"),
        &RESTART_POLICIES,
        causes,
    );
    validate_enum(
        &spec["dnsPolicy"],
        &format!("{path}.dnsPolicy"),
        &DNS_POLICIES,
        causes,
    );
}

/// An init container's `restartPolicy` may only be `Always`, which makes it a sidecar, and
/// only a sidecar may have probes or lifecycle hooks (upstream's validateInitContainers).
fn validate_init_container_restart(container: &Value, path: &str, causes: &mut Vec<FieldCause>) {
    let policy = &container["restartPolicy"];
    if !policy.is_null() && policy != "Always" {
        causes.push(not_supported(
            format!("{path}.restartPolicy"),
            &go_scalar(policy),
            &["Always"],
        ));
    }
    if policy != "Always" {
        for field in [
            "lifecycle",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
        ] {
            if !container[field].is_null() {
                causes.push(forbidden(
                    format!("{path}.{field}"),
                    "may not be set for init containers without restartPolicy=Always",
                ));
            }
        }
    }
}

/// Checks the pod's volumes and returns the names of the valid ones, the only ones a
/// container may mount.
fn validate_volumes<'a>(
    volumes: &'a Value,
    path: &str,
    causes: &mut Vec<FieldCause>,
) -> std::collections::HashSet<&'a str> {
    let mut names = std::collections::HashSet::new();
    for (index, volume) in elements(volumes).enumerate() {
        let name_path = format!("{path}[{index}].name");
        let name = text(&volume["name"]);
        let mut errors = Vec::new();
        if name.is_empty() {
            errors.push(required(&name_path, ""));
        } else {
            push_invalid_each(
                &mut errors,
                &name_path,
                &go_quote(name),
                dns1123_label_errors(name),
            );
        }
        if names.contains(name) {
            errors.push(duplicate(&name_path, &go_quote(name)));
        }
        if errors.is_empty() {
            names.insert(name);
        }
        causes.extend(errors);
    }
    names
}

fn validate_container(
    container: &Value,
    path: &str,
    volume_names: &std::collections::HashSet<&str>,
    causes: &mut Vec<FieldCause>,
) {
    let name = text(&container["name"]);
    let name_path = format!("{path}.name");
    if name.is_empty() {
        causes.push(required(&name_path, ""));
    } else {
        push_invalid_each(
            causes,
            &name_path,
            &go_quote(name),
            dns1123_label_errors(name),
        );
    }
    if text(&container["image"]).is_empty() {
        causes.push(required(format!("{path}.image"), ""));
    }
    validate_enum(
        &container["imagePullPolicy"],
        &format!("{path}.imagePullPolicy"),
        &PULL_POLICIES,
        causes,
    );
    validate_container_ports(&container["ports"], &format!("{path}.ports"), causes);
    for (index, variable) in elements(&container["env"]).enumerate() {
        let name_path = format!("{path}.env[{index}].name");
        let name = text(&variable["name"]);
        if name.is_empty() {
            causes.push(required(&name_path, ""));
        } else {
            push_invalid_each(
                causes,
                &name_path,
                &go_quote(name),
                env_var_name_errors(name),
            );
        }
    }
    let mut mount_paths = std::collections::HashSet::new();
    for (index, mount) in elements(&container["volumeMounts"]).enumerate() {
        let mount_path = format!("{path}.volumeMounts[{index}]");
        let volume = text(&mount["name"]);
        if volume.is_empty() {
            causes.push(required(format!("{mount_path}.name"), ""));
        }
        if !volume_names.contains(volume) {
            causes.push(not_found(format!("{mount_path}.name"), &go_quote(volume)));
        }
        let target = text(&mount["mountPath"]);
        if target.is_empty() {
            causes.push(required(format!("{mount_path}.mountPath"), ""));
        }
        if !mount_paths.insert(target) {
            causes.push(invalid(
                format!("{mount_path}.mountPath"),
                &go_quote(target),
                "must be unique",
            ));
        }
    }
    validate_resources(
        &container["resources"],
        &format!("{path}.resources"),
        causes,
    );
}

fn validate_container_ports(ports: &Value, path: &str, causes: &mut Vec<FieldCause>) {
    let mut names = std::collections::HashSet::new();
    for (index, port) in elements(ports).enumerate() {
        let port_path = format!("{path}[{index}]");
        let name = text(&port["name"]);
        if !name.is_empty() {
            let errors = port_name_errors(name);
            if !errors.is_empty() {
                push_invalid_each(
                    causes,
                    &format!("{port_path}.name"),
                    &go_quote(name),
                    errors,
                );
            } else if !names.insert(name) {
                causes.push(duplicate(format!("{port_path}.name"), &go_quote(name)));
            }
        }
        let container_port = port["containerPort"].as_i64().unwrap_or(0);
        if container_port == 0 {
            causes.push(required(format!("{port_path}.containerPort"), ""));
        } else if !is_valid_port_number(container_port) {
            causes.push(invalid(
                format!("{port_path}.containerPort"),
                &container_port.to_string(),
                PORT_RANGE_MESSAGE,
            ));
        }
        // A host port of zero means none.
        let host_port = port["hostPort"].as_i64().unwrap_or(0);
        if host_port != 0 && !is_valid_port_number(host_port) {
            causes.push(invalid(
                format!("{port_path}.hostPort"),
                &host_port.to_string(),
                PORT_RANGE_MESSAGE,
            ));
        }
        validate_enum(
            &port["protocol"],
            &format!("{port_path}.protocol"),
            &PORT_PROTOCOLS,
            causes,
        );
    }
}

/// Checks a workload's pod template at `path`: its labels and annotations and its pod spec.
fn validate_pod_template(template: &Value, path: &str, causes: &mut Vec<FieldCause>) {
    validate_labels(
        &template["metadata"]["labels"],
        &format!("{path}.metadata.labels"),
        causes,
    );
    validate_annotations(
        &template["metadata"]["annotations"],
        &format!("{path}.metadata.annotations"),
        causes,
    );
    validate_pod_spec(&template["spec"], &format!("{path}.spec"), causes);
}

// Pod updates: a running pod's spec is fixed but for a few fields the kubelet can apply in place.

const UPDATABLE_POD_SPEC_FIELDS: [&str; 5] = [
    "`spec.containers[*].image`",
    "`spec.initContainers[*].image`",
    "`spec.activeDeadlineSeconds`",
    "`spec.tolerations` (only additions to existing tolerations)",
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
];

/// `value` without what Go cannot tell from absence: nulls, empty strings and empty lists. Two
/// specs equal after this are equal the way `apiequality.Semantic.DeepEqual` compares them.
fn without_unset_fields(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, field)| !is_unset(field))
                .map(|(key, field)| (key.clone(), without_unset_fields(field)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_unset_fields).collect()),
        other => other.clone(),
    }
}

fn is_unset(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(text) => text.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

/// The paths under `path` at which `new` and `old` differ, both already without unset fields.
fn changed_paths(new: &Value, old: &Value, path: &str, changed: &mut Vec<String>) {
    match (new, old) {
        (Value::Object(new_map), Value::Object(old_map)) => {
            let mut keys: Vec<&String> = new_map.keys().chain(old_map.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let (new_field, old_field) = (&new[key.as_str()], &old[key.as_str()]);
                changed_paths(new_field, old_field, &format!("{path}.{key}"), changed);
            }
        }
        (Value::Array(new_items), Value::Array(old_items))
            if new_items.len() == old_items.len() =>
        {
            for (index, (new_item, old_item)) in new_items.iter().zip(old_items).enumerate() {
                changed_paths(new_item, old_item, &format!("{path}[{index}]"), changed);
            }
        }
        _ if new != old => changed.push(path.to_string()),
        _ => {}
    }
}

fn validate_pod_update(new: &Value, old: &Value, causes: &mut Vec<FieldCause>) {
    let (new_spec, old_spec) = (&new["spec"], &old["spec"]);
    let mut counts_changed = false;
    for list in ["containers", "initContainers"] {
        let count = |spec: &Value| spec[list].as_array().map_or(0, Vec::len);
        if count(new_spec) != count(old_spec) {
            causes.push(forbidden(
                format!("spec.{list}"),
                "pod updates may not add or remove containers",
            ));
            counts_changed = true;
        }
    }
    if counts_changed {
        return;
    }

    let deadline_path = "spec.activeDeadlineSeconds";
    match (
        new_spec["activeDeadlineSeconds"].as_i64(),
        old_spec["activeDeadlineSeconds"].as_i64(),
    ) {
        (Some(new_deadline), _) if !(0..=i64::from(i32::MAX)).contains(&new_deadline) => {
            let detail = format!("must be between 0 and {}, inclusive", i32::MAX);
            causes.push(invalid(deadline_path, &new_deadline.to_string(), &detail));
            return;
        }
        (Some(new_deadline), Some(old_deadline)) if old_deadline < new_deadline => {
            causes.push(invalid(
                deadline_path,
                &new_deadline.to_string(),
                "must be less than or equal to previous value",
            ));
            return;
        }
        (None, Some(_)) => {
            causes.push(invalid(
                deadline_path,
                "null",
                "must not update from a positive integer to nil value",
            ));
        }
        _ => {}
    }

    // Every existing toleration must stay, though its tolerationSeconds may change, because the
    // node lifecycle controller may already have acted on it.
    let without_seconds = |toleration: &Value| {
        let mut toleration = without_unset_fields(toleration);
        if let Some(map) = toleration.as_object_mut() {
            map.remove("tolerationSeconds");
        }
        toleration
    };
    let new_tolerations: Vec<Value> = elements(&new_spec["tolerations"])
        .map(without_seconds)
        .collect();
    if !elements(&old_spec["tolerations"])
        .all(|old| new_tolerations.contains(&without_seconds(old)))
    {
        causes.push(forbidden(
            "spec.tolerations",
            "existing toleration can not be modified except its tolerationSeconds",
        ));
    }

    // Compare the specs with the updatable fields taken from the old one.
    let mut munged = new_spec.clone();
    for list in ["containers", "initContainers"] {
        if let Some(containers) = munged[list].as_array_mut() {
            for (index, container) in containers.iter_mut().enumerate() {
                container["image"] = old_spec[list][index]["image"].clone();
            }
        }
    }
    if munged.is_object() {
        munged["activeDeadlineSeconds"] = old_spec["activeDeadlineSeconds"].clone();
        munged["tolerations"] = old_spec["tolerations"].clone();
    }
    let (munged, old_spec) = (
        without_unset_fields(&munged),
        without_unset_fields(old_spec),
    );
    if munged != old_spec {
        // Upstream appends a Go diff of the two specs; the changed paths serve the same reader.
        let mut changed = Vec::new();
        changed_paths(&munged, &old_spec, "spec", &mut changed);
        let detail = format!(
            "pod updates may not change fields other than {}\nchanged: {}",
            UPDATABLE_POD_SPEC_FIELDS.join(","),
            changed.join(", ")
        );
        causes.push(forbidden("spec", &detail));
    }
}

// Services.

const SERVICE_TYPES: [&str; 4] = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const SESSION_AFFINITIES: [&str; 2] = ["ClientIP", "None"];
/// The kubelet's port, which a load balancer must not expose because clouds open it widely.
const KUBELET_PORT: i64 = 10250;

/// A Service port's identity as `%#v` prints the `core.ServicePort` upstream compares.
fn go_service_port_key(protocol: &str, port: i64) -> String {
    format!(
        "core.ServicePort{{Name:\"\", Protocol:{}, AppProtocol:(*string)(nil), Port:{port}, TargetPort:intstr.IntOrString{{Type:0, IntVal:0, StrVal:\"\"}}, NodePort:0}}",
        go_quote(protocol)
    )
}

fn validate_service(service: &Value, old: Option<&Value>, causes: &mut Vec<FieldCause>) {
    let spec = &service["spec"];
    if let Some(old) = old {
        validate_cluster_ips_update(spec, &old["spec"], causes);
    }
    let service_type = text(&spec["type"]);
    let headless = text(&spec["clusterIP"]) == "None";
    let ports: Vec<&Value> = elements(&spec["ports"]).collect();
    if ports.is_empty() && !headless && service_type != "ExternalName" {
        causes.push(required("spec.ports", ""));
    }
    let first_cluster_ip = go_quote(text(&spec["clusterIPs"][0]));
    match service_type {
        "LoadBalancer" => {
            if headless {
                causes.push(invalid(
                    "spec.clusterIPs[0]",
                    &first_cluster_ip,
                    "may not be set to 'None' for LoadBalancer services",
                ));
            }
            for (index, port) in ports.iter().enumerate() {
                if port["port"].as_i64() == Some(KUBELET_PORT) {
                    let detail = format!(
                        "may not expose port {KUBELET_PORT} externally since it is used by kubelet"
                    );
                    causes.push(invalid(
                        format!("spec.ports[{index}]"),
                        &KUBELET_PORT.to_string(),
                        &detail,
                    ));
                }
            }
        }
        "NodePort" if headless => {
            causes.push(invalid(
                "spec.clusterIPs[0]",
                &first_cluster_ip,
                "may not be set to 'None' for NodePort services",
            ));
        }
        "ExternalName" => {
            for (field, value) in [
                ("clusterIPs", &spec["clusterIPs"]),
                ("ipFamilies", &spec["ipFamilies"]),
                ("ipFamilyPolicy", &spec["ipFamilyPolicy"]),
            ] {
                if !is_unset(value) {
                    causes.push(forbidden(
                        format!("spec.{field}"),
                        "may not be set for ExternalName services",
                    ));
                }
            }
            // The name is a CNAME target, which may end with a dot to mark it fully qualified.
            let target = text(&spec["externalName"]);
            let target = target.strip_suffix('.').unwrap_or(target);
            if target.is_empty() {
                causes.push(required("spec.externalName", ""));
            } else {
                push_invalid_each(
                    causes,
                    "spec.externalName",
                    &go_quote(target),
                    dns1123_subdomain_errors(target),
                );
            }
        }
        _ => {}
    }

    // Names tell ports apart in Endpoints, so they are needed once there is more than one.
    let name_required = ports.len() > 1;
    let mut names = std::collections::HashSet::new();
    for (index, port) in ports.iter().enumerate() {
        let port_path = format!("spec.ports[{index}]");
        let name = text(&port["name"]);
        if name_required && name.is_empty() {
            causes.push(required(format!("{port_path}.name"), ""));
        } else if !name.is_empty() {
            push_invalid_each(
                causes,
                &format!("{port_path}.name"),
                &go_quote(name),
                dns1123_label_errors(name),
            );
            if !names.insert(name) {
                causes.push(duplicate(format!("{port_path}.name"), &go_quote(name)));
            }
        }
        let number = port["port"].as_i64().unwrap_or(0);
        if !is_valid_port_number(number) {
            causes.push(invalid(
                format!("{port_path}.port"),
                &number.to_string(),
                PORT_RANGE_MESSAGE,
            ));
        }
        validate_enum(
            &port["protocol"],
            &format!("{port_path}.protocol"),
            &PORT_PROTOCOLS,
            causes,
        );
        let target_path = format!("{port_path}.targetPort");
        match &port["targetPort"] {
            Value::String(target_name) => {
                push_invalid_each(
                    causes,
                    &target_path,
                    &go_quote(target_name),
                    port_name_errors(target_name),
                );
            }
            target => {
                let target_number = target.as_i64().unwrap_or(0);
                if !is_valid_port_number(target_number) {
                    causes.push(invalid(
                        target_path,
                        &target_number.to_string(),
                        PORT_RANGE_MESSAGE,
                    ));
                }
            }
        }
    }
    validate_labels(&spec["selector"], "spec.selector", causes);
    validate_enum(
        &spec["sessionAffinity"],
        "spec.sessionAffinity",
        &SESSION_AFFINITIES,
        causes,
    );
    validate_enum(&spec["type"], "spec.type", &SERVICE_TYPES, causes);

    // Only Services reachable on every node's address have node ports.
    if !matches!(service_type, "NodePort" | "LoadBalancer") {
        for (index, port) in ports.iter().enumerate() {
            if port["nodePort"].as_i64().unwrap_or(0) != 0 {
                let detail = format!("may not be used when `type` is '{service_type}'");
                causes.push(forbidden(format!("spec.ports[{index}].nodePort"), &detail));
            }
        }
    }
    let mut node_ports = std::collections::HashSet::new();
    let mut service_ports = std::collections::HashSet::new();
    for (index, port) in ports.iter().enumerate() {
        let protocol = text(&port["protocol"]);
        let node_port = port["nodePort"].as_i64().unwrap_or(0);
        if node_port != 0 && !node_ports.insert((protocol, node_port)) {
            causes.push(duplicate(
                format!("spec.ports[{index}].nodePort"),
                &node_port.to_string(),
            ));
        }
    }
    for (index, port) in ports.iter().enumerate() {
        let protocol = text(&port["protocol"]);
        let number = port["port"].as_i64().unwrap_or(0);
        if !service_ports.insert((protocol, number)) {
            causes.push(duplicate(
                format!("spec.ports[{index}]"),
                &go_service_port_key(protocol, number),
            ));
        }
    }
}

/// A Service keeps its cluster IPs for life: clients and DNS caches hold on to them. A
/// secondary address may be added or released, as dual-stack upgrades and downgrades do.
fn validate_cluster_ips_update(new_spec: &Value, old_spec: &Value, causes: &mut Vec<FieldCause>) {
    if text(&new_spec["type"]) == "ExternalName" || text(&old_spec["type"]) == "ExternalName" {
        return;
    }
    if text(&new_spec["clusterIP"]) == "None" && text(&old_spec["clusterIP"]) == "None" {
        return;
    }
    let new_ips: Vec<&str> = elements(&new_spec["clusterIPs"]).map(text).collect();
    let old_ips: Vec<&str> = elements(&old_spec["clusterIPs"]).map(text).collect();
    // An update that leaves the addresses out keeps the allocated ones: kube-apiserver copies
    // them over before validating, and skiff's allocator does the same after.
    if new_ips.is_empty() && text(&new_spec["clusterIP"]).is_empty() {
        return;
    }
    let shown = go_string_slice(&new_spec["clusterIPs"]);
    let primary_changed = !old_ips.is_empty() && !new_ips.is_empty() && old_ips[0] != new_ips[0];
    match old_ips.len().cmp(&new_ips.len()) {
        std::cmp::Ordering::Equal => {
            for (index, (old_ip, new_ip)) in old_ips.iter().zip(&new_ips).enumerate() {
                if old_ip != new_ip {
                    causes.push(invalid(
                        format!("spec.clusterIPs[{index}]"),
                        &shown,
                        "may not change once set",
                    ));
                }
            }
        }
        std::cmp::Ordering::Greater => {
            if new_ips.is_empty() {
                causes.push(invalid(
                    "spec.clusterIPs[0]",
                    &shown,
                    "primary clusterIP can not be unset",
                ));
            }
            if primary_changed {
                causes.push(invalid(
                    "spec.clusterIPs[0]",
                    &shown,
                    "may not change once set",
                ));
            }
            if new_ips.len() == 1 && text(&new_spec["ipFamilyPolicy"]) != "SingleStack" {
                causes.push(invalid(
                    "spec.clusterIPs[0]",
                    &shown,
                    "`ipFamilyPolicy` must be set to 'SingleStack' when releasing the secondary clusterIP",
                ));
            }
        }
        std::cmp::Ordering::Less => {
            if primary_changed {
                causes.push(invalid(
                    "spec.clusterIPs[0]",
                    &shown,
                    "may not change once set",
                ));
            }
        }
    }
}

// Workloads: Deployments, ReplicaSets and DaemonSets.

const DEPLOYMENT_STRATEGIES: [&str; 2] = ["Recreate", "RollingUpdate"];
const DAEMON_SET_STRATEGIES: [&str; 2] = ["RollingUpdate", "OnDelete"];
/// A label selector as `%#v` prints a `metav1.LabelSelector`.
fn go_label_selector(selector: &Value) -> String {
    let expressions = match selector["matchExpressions"].as_array() {
        None => "[]v1.LabelSelectorRequirement(nil)".to_string(),
        Some(requirements) => {
            let shown: Vec<String> = requirements
                .iter()
                .map(|requirement| {
                    format!(
                        "v1.LabelSelectorRequirement{{Key:{}, Operator:{}, Values:{}}}",
                        go_quote(text(&requirement["key"])),
                        go_quote(text(&requirement["operator"])),
                        go_string_slice(&requirement["values"])
                    )
                })
                .collect();
            format!("[]v1.LabelSelectorRequirement{{{}}}", shown.join(", "))
        }
    };
    format!(
        "v1.LabelSelector{{MatchLabels:{}, MatchExpressions:{expressions}}}",
        go_string_map(&selector["matchLabels"])
    )
}

/// An int-or-string field as `%#v` prints an `intstr.IntOrString`.
fn go_int_or_string(value: &Value) -> String {
    match value {
        Value::String(text) => format!(
            "intstr.IntOrString{{Type:1, IntVal:0, StrVal:{}}}",
            go_quote(text)
        ),
        other => format!(
            "intstr.IntOrString{{Type:0, IntVal:{}, StrVal:\"\"}}",
            other.as_i64().unwrap_or(0)
        ),
    }
}

/// A workload's update strategy as `%#v` prints it; upstream shows the whole struct when its
/// type is unknown. `go_type` names the strategy struct, as `DeploymentStrategy`.
fn go_update_strategy(strategy: &Value, go_type: &str, rolling_update_type: &str) -> String {
    let rolling_update = if strategy["rollingUpdate"].is_null() {
        "nil"
    } else {
        "..."
    };
    format!(
        "apps.{go_type}{{Type:{}, RollingUpdate:(*apps.{rolling_update_type})({rolling_update})}}",
        go_quote(text(&strategy["type"]))
    )
}

fn validate_label_selector(selector: &Value, path: &str, causes: &mut Vec<FieldCause>) {
    validate_labels(
        &selector["matchLabels"],
        &format!("{path}.matchLabels"),
        causes,
    );
    for (index, requirement) in elements(&selector["matchExpressions"]).enumerate() {
        let requirement_path = format!("{path}.matchExpressions[{index}]");
        let has_values = !is_unset(&requirement["values"]);
        let operator = text(&requirement["operator"]);
        match operator {
            "In" | "NotIn" if !has_values => causes.push(required(
                format!("{requirement_path}.values"),
                "must be specified when `operator` is 'In' or 'NotIn'",
            )),
            "Exists" | "DoesNotExist" if has_values => causes.push(forbidden(
                format!("{requirement_path}.values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => causes.push(invalid(
                format!("{requirement_path}.operator"),
                &go_quote(operator),
                "not a valid selector operator",
            )),
        }
        let key = text(&requirement["key"]);
        push_invalid_each(
            causes,
            &format!("{requirement_path}.key"),
            &go_quote(key),
            qualified_name_errors(key),
        );
        for (value_index, value) in elements(&requirement["values"]).enumerate() {
            let value = text(value);
            let value_path = format!("{requirement_path}.values[{value_index}]");
            push_invalid_each(
                causes,
                &value_path,
                &go_quote(value),
                label_value_errors(value),
            );
        }
    }
}

/// Whether `selector` selects an object labelled `labels`, or `None` when the selector cannot
/// be used because one of its requirements is malformed. A missing selector selects nothing.
fn selector_matches(selector: &Value, labels: &Value) -> Option<bool> {
    if selector.is_null() {
        return Some(false);
    }
    let label = |key: &str| labels.get(key).and_then(Value::as_str);
    let mut matches =
        entries(&selector["matchLabels"]).all(|(key, value)| label(key) == Some(text(value)));
    for requirement in elements(&selector["matchExpressions"]) {
        let values: Vec<&str> = elements(&requirement["values"]).map(text).collect();
        let found = label(text(&requirement["key"]));
        matches &= match text(&requirement["operator"]) {
            "In" if !values.is_empty() => found.is_some_and(|value| values.contains(&value)),
            "NotIn" if !values.is_empty() => found.is_none_or(|value| !values.contains(&value)),
            "Exists" if values.is_empty() => found.is_some(),
            "DoesNotExist" if values.is_empty() => found.is_none(),
            _ => return None,
        };
    }
    Some(matches)
}

fn has_requirements(selector: &Value) -> bool {
    !is_unset(&selector["matchExpressions"])
        || selector["matchLabels"]
            .as_object()
            .is_some_and(|labels| !labels.is_empty())
}

/// The amount an int-or-percent field stands for, in its own unit, as upstream compares them.
fn int_or_percent_amount(value: &Value) -> i64 {
    match value {
        Value::String(text) => text.trim_end_matches('%').parse().unwrap_or(0),
        other => other.as_i64().unwrap_or(0),
    }
}

/// Checks a field that is a non-negative count or a percentage, such as `maxSurge`.
fn validate_int_or_percent(value: &Value, path: &str, causes: &mut Vec<FieldCause>) {
    match value {
        Value::String(percent) => {
            let digits = percent.strip_suffix('%').unwrap_or("");
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                causes.push(invalid(
                    path,
                    &go_int_or_string(value),
                    "a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%' or '93%', regex used for validation is '[0-9]+%')",
                ));
            } else if int_or_percent_amount(value) > 100 {
                causes.push(invalid(
                    path,
                    &go_int_or_string(value),
                    "must not be greater than 100%",
                ));
            }
        }
        other => {
            let count = other.as_i64().unwrap_or(0);
            if count < 0 {
                causes.push(invalid(path, &count.to_string(), NEGATIVE_MESSAGE));
            }
        }
    }
}

/// Checks a rolling update's `maxUnavailable` and `maxSurge`. A rollout needs room to move: a
/// Deployment needs at least one of them non-zero, and a DaemonSet, which cannot run two pods
/// on a node the old way and the new at once, exactly one.
fn validate_rolling_update(
    rolling_update: &Value,
    path: &str,
    daemon_set: bool,
    causes: &mut Vec<FieldCause>,
) {
    let (max_unavailable, max_surge) = (
        &rolling_update["maxUnavailable"],
        &rolling_update["maxSurge"],
    );
    let unavailable_path = format!("{path}.maxUnavailable");
    let surge_path = format!("{path}.maxSurge");
    validate_int_or_percent(max_unavailable, &unavailable_path, causes);
    validate_int_or_percent(max_surge, &surge_path, causes);
    let has_unavailable = int_or_percent_amount(max_unavailable) != 0;
    let has_surge = int_or_percent_amount(max_surge) != 0;
    if !has_unavailable && !has_surge {
        let detail = if daemon_set {
            "cannot be 0 when maxSurge is 0"
        } else {
            "may not be 0 when `maxSurge` is 0"
        };
        causes.push(invalid(
            unavailable_path,
            &go_int_or_string(max_unavailable),
            detail,
        ));
    } else if daemon_set && has_unavailable && has_surge {
        causes.push(invalid(
            surge_path,
            &go_int_or_string(max_surge),
            "may not be set when maxUnavailable is non-zero",
        ));
    }
}

fn validate_deployment_strategy(strategy: &Value, causes: &mut Vec<FieldCause>) {
    match text(&strategy["type"]) {
        "Recreate" if !strategy["rollingUpdate"].is_null() => causes.push(forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        )),
        "Recreate" => {}
        "RollingUpdate" if strategy["rollingUpdate"].is_null() => causes.push(required(
            "spec.strategy.rollingUpdate",
            "this should be defaulted and never be nil",
        )),
        "RollingUpdate" => validate_rolling_update(
            &strategy["rollingUpdate"],
            "spec.strategy.rollingUpdate",
            false,
            causes,
        ),
        _ => {
            let shown =
                go_update_strategy(strategy, "DeploymentStrategy", "RollingUpdateDeployment");
            causes.push(not_supported(
                "spec.strategy",
                &shown,
                &DEPLOYMENT_STRATEGIES,
            ));
        }
    }
}

fn validate_daemon_set_strategy(strategy: &Value, causes: &mut Vec<FieldCause>) {
    match text(&strategy["type"]) {
        "OnDelete" => {}
        "RollingUpdate" if strategy["rollingUpdate"].is_null() => {
            causes.push(required("spec.updateStrategy.rollingUpdate", ""));
        }
        "RollingUpdate" => validate_rolling_update(
            &strategy["rollingUpdate"],
            "spec.updateStrategy.rollingUpdate",
            true,
            causes,
        ),
        _ => {
            let shown = go_update_strategy(
                strategy,
                "DaemonSetUpdateStrategy",
                "RollingUpdateDaemonSet",
            );
            causes.push(not_supported(
                "spec.updateStrategy",
                &shown,
                &DAEMON_SET_STRATEGIES,
            ));
        }
    }
}

/// Checks a Deployment, ReplicaSet or DaemonSet: the parts they share (selector, template)
/// and each kind's own replicas and update strategy.
fn validate_workload(
    kind: &str,
    object: &Value,
    old: Option<&Value>,
    causes: &mut Vec<FieldCause>,
) {
    let spec = &object["spec"];
    let daemon_set = kind == "DaemonSet";
    if !daemon_set {
        validate_non_negative(&spec["replicas"], "spec.replicas", causes);
    }
    let selector = &spec["selector"];
    if selector.is_null() {
        causes.push(required("spec.selector", ""));
    } else {
        validate_label_selector(selector, "spec.selector", causes);
        if !has_requirements(selector) {
            // Upstream says "deployment" for ReplicaSets too.
            let owner = if daemon_set {
                "daemonset"
            } else {
                "deployment"
            };
            let detail = format!("empty selector is invalid for {owner}");
            causes.push(invalid(
                "spec.selector",
                &go_label_selector(selector),
                &detail,
            ));
        }
    }
    let template = &spec["template"];
    let template_labels = &template["metadata"]["labels"];
    // An empty selector selects everything, so there is nothing to match; it is refused above.
    if selector.is_null() || has_requirements(selector) {
        match selector_matches(selector, template_labels) {
            Some(true) => {}
            Some(false) => causes.push(invalid(
                "spec.template.metadata.labels",
                &go_string_map(template_labels),
                "`selector` does not match template `labels`",
            )),
            None if !daemon_set => causes.push(invalid(
                "spec.selector",
                &go_label_selector(selector),
                "invalid label selector",
            )),
            None => {}
        }
    }
    validate_pod_template(template, "spec.template", causes);
    // The controller replaces pods that stop, so their containers must restart in place too.
    let restart_policy = text(&template["spec"]["restartPolicy"]);
    if restart_policy != "Always" {
        causes.push(not_supported(
            "spec.template.spec.restartPolicy",
            &go_quote(restart_policy),
            &["Always"],
        ));
    }
    let deadline = &template["spec"]["activeDeadlineSeconds"];
    if !deadline.is_null() {
        let path = "spec.template.spec.activeDeadlineSeconds";
        if daemon_set {
            causes.push(invalid(
                path,
                &go_scalar(deadline),
                "activeDeadlineSeconds must be nil for DaemonSets",
            ));
        } else {
            causes.push(forbidden(
                path,
                "activeDeadlineSeconds in ReplicaSet is not Supported",
            ));
        }
    }
    match kind {
        "Deployment" => validate_deployment_strategy(&spec["strategy"], causes),
        "DaemonSet" => validate_daemon_set_strategy(&spec["updateStrategy"], causes),
        _ => {}
    }
    // A changed selector would orphan the pods the old one selected.
    if let Some(old) = old
        && without_unset_fields(selector) != without_unset_fields(&old["spec"]["selector"])
    {
        causes.push(invalid(
            "spec.selector",
            &go_label_selector(selector),
            FIELD_IMMUTABLE_MESSAGE,
        ));
    }
}

// Jobs.

const JOB_RESTART_POLICIES: [&str; 2] = ["OnFailure", "Never"];
const JOB_COMPLETION_MODES: [&str; 2] = ["NonIndexed", "Indexed"];
const JOB_POD_REPLACEMENT_POLICIES: [&str; 2] = ["TerminatingOrFailed", "Failed"];
/// The most completions an Indexed Job may have (upstream's `maxParallelismForIndexedJob`
/// is the same number).
const MAX_INDEXED_COMPLETIONS: i64 = 100_000;

/// `ValidateJob` and, on update, `ValidateJobSpecUpdate` of `pkg/apis/batch/validation`.
fn validate_job(job: &Value, old: Option<&Value>, causes: &mut Vec<FieldCause>) {
    let spec = &job["spec"];
    for field in [
        "parallelism",
        "completions",
        "activeDeadlineSeconds",
        "backoffLimit",
        "ttlSecondsAfterFinished",
    ] {
        validate_non_negative(&spec[field], &format!("spec.{field}"), causes);
    }
    validate_enum(
        &spec["completionMode"],
        "spec.completionMode",
        &JOB_COMPLETION_MODES,
        causes,
    );
    if spec["completionMode"] == "Indexed" {
        match spec["completions"].as_i64() {
            None => causes.push(required(
                "spec.completions",
                "when completion mode is Indexed",
            )),
            Some(completions) if completions > MAX_INDEXED_COMPLETIONS => causes.push(invalid(
                "spec.completions",
                &completions.to_string(),
                &format!("must be less than or equal to {MAX_INDEXED_COMPLETIONS}"),
            )),
            Some(_) => {}
        }
    }
    validate_enum(
        &spec["podReplacementPolicy"],
        "spec.podReplacementPolicy",
        &JOB_POD_REPLACEMENT_POLICIES,
        causes,
    );
    if !spec["podFailurePolicy"].is_null() && spec["podReplacementPolicy"] == "TerminatingOrFailed"
    {
        causes.push(not_supported(
            "spec.podReplacementPolicy",
            &go_quote("TerminatingOrFailed"),
            &["Failed"],
        ));
    }

    let selector = &spec["selector"];
    let template = &spec["template"];
    let template_labels = &template["metadata"]["labels"];
    if selector.is_null() {
        causes.push(required("spec.selector", ""));
    } else {
        validate_label_selector(selector, "spec.selector", causes);
        // An empty selector would select every pod of the namespace.
        if !has_requirements(selector) || selector_matches(selector, template_labels) == Some(false)
        {
            causes.push(invalid(
                "spec.template.metadata.labels",
                &go_string_map(template_labels),
                "`selector` does not match template `labels`",
            ));
        }
    }
    if spec["manualSelector"] != Value::Bool(true) {
        validate_generated_selector(job, causes);
    }
    validate_pod_template(template, "spec.template", causes);
    // A Job's pods run to completion: one that restarts forever could never count.
    let restart_policy = text(&template["spec"]["restartPolicy"]);
    if !JOB_RESTART_POLICIES.contains(&restart_policy) {
        causes.push(not_supported(
            "spec.template.spec.restartPolicy",
            &go_quote(restart_policy),
            &JOB_RESTART_POLICIES,
        ));
    }

    let Some(old) = old else {
        return;
    };
    let old_spec = &old["spec"];
    for field in [
        "completions",
        "completionMode",
        "podFailurePolicy",
        "backoffLimitPerIndex",
        "successPolicy",
        "managedBy",
    ] {
        validate_unchanged(
            &spec[field],
            &old_spec[field],
            &format!("spec.{field}"),
            causes,
        );
    }
    if without_unset_fields(selector) != without_unset_fields(&old_spec["selector"]) {
        causes.push(invalid(
            "spec.selector",
            &go_label_selector(selector),
            FIELD_IMMUTABLE_MESSAGE,
        ));
    }
    // Pods already made from the template would differ from later ones. A suspended Job
    // that never started has no pods yet: where its pods will run (and their labels) may
    // still change, as a queueing controller does before it admits the Job.
    let mut allowed_template = old_spec["template"].clone();
    let never_started = old_spec["suspend"] == Value::Bool(true)
        && spec["suspend"] == Value::Bool(true)
        && old["status"]["startTime"].is_null();
    if never_started {
        for (part, field) in [
            ("metadata", "labels"),
            ("metadata", "annotations"),
            ("spec", "nodeSelector"),
            ("spec", "tolerations"),
            ("spec", "affinity"),
            ("spec", "schedulingGates"),
        ] {
            allowed_template[part][field] = template[part][field].clone();
        }
    }
    if without_unset_fields(template) != without_unset_fields(&allowed_template) {
        causes.push(invalid(
            "spec.template",
            "core.PodTemplateSpec{...}",
            FIELD_IMMUTABLE_MESSAGE,
        ));
    }
}

/// Unless the client chose its own selector, the one the server generated must still select
/// the Job's uid, and the template must carry it (`validateGeneratedSelector`).
fn validate_generated_selector(job: &Value, causes: &mut Vec<FieldCause>) {
    let uid = text(&job["metadata"]["uid"]);
    let template_labels = &job["spec"]["template"]["metadata"]["labels"];
    if template_labels.is_null() {
        causes.push(required(
            "spec.template.metadata.labels",
            "`controller-uid` is required",
        ));
        return;
    }
    for label in ["controller-uid", super::defaults::JOB_CONTROLLER_UID_LABEL] {
        if template_labels[label].as_str() != Some(uid) {
            causes.push(invalid(
                "spec.template.metadata.labels",
                &go_string_map(template_labels),
                &format!("must be '{label}: {uid}'"),
            ));
        }
    }
    let selector = &job["spec"]["selector"];
    if !selector.is_null()
        && selector["matchLabels"][super::defaults::JOB_CONTROLLER_UID_LABEL].as_str() != Some(uid)
    {
        causes.push(invalid(
            "spec.selector.matchLabels",
            &go_string_map(&selector["matchLabels"]),
            "`selector` not auto-generated",
        ));
    }
}

// ConfigMaps and Secrets.

/// The most data a ConfigMap or Secret may carry, so that it fits in one etcd value.
const MAX_DATA_SIZE_BYTES: usize = 1024 * 1024;
const IMMUTABLE_DATA_MESSAGE: &str = "field is immutable when `immutable` is set";

/// The size of the bytes a base64 text decodes to.
fn decoded_base64_length(encoded: &str) -> usize {
    encoded.trim_end_matches('=').len() * 3 / 4
}

/// Checks that `field` kept its old value, as `ValidateImmutableField` does.
fn validate_unchanged(new: &Value, old: &Value, field: &str, causes: &mut Vec<FieldCause>) {
    if without_unset_fields(new) != without_unset_fields(old) {
        causes.push(invalid(field, &go_scalar(new), FIELD_IMMUTABLE_MESSAGE));
    }
}

/// Once `immutable` is set, neither it nor the data may change: kubelets stop watching such
/// objects and would never see the change.
fn validate_immutable_data(
    new: &Value,
    old: &Value,
    data_fields: &[&str],
    causes: &mut Vec<FieldCause>,
) {
    if old["immutable"] != Value::Bool(true) {
        return;
    }
    if new["immutable"] != Value::Bool(true) {
        causes.push(forbidden("immutable", IMMUTABLE_DATA_MESSAGE));
    }
    for field in data_fields {
        if without_unset_fields(&new[*field]) != without_unset_fields(&old[*field]) {
            causes.push(forbidden(*field, IMMUTABLE_DATA_MESSAGE));
        }
    }
}

fn validate_config_map(config_map: &Value, old: Option<&Value>, causes: &mut Vec<FieldCause>) {
    if let Some(old) = old {
        validate_immutable_data(config_map, old, &["data", "binaryData"], causes);
    }
    let mut total_size = 0;
    // Keys become file names in the same volume, so one may not appear in both maps.
    for (field, other) in [("data", "binaryData"), ("binaryData", "data")] {
        for (key, value) in entries(&config_map[field]) {
            let key_path = format!("{field}[{key}]");
            push_invalid_each(
                causes,
                &key_path,
                &go_quote(key),
                config_map_key_errors(key),
            );
            if config_map[other].get(key).is_some() {
                causes.push(invalid(
                    &key_path,
                    &go_quote(key),
                    &format!("duplicate of key present in {other}"),
                ));
            }
            total_size += match field {
                "data" => text(value).len(),
                _ => decoded_base64_length(text(value)),
            };
        }
    }
    if total_size > MAX_DATA_SIZE_BYTES {
        // Upstream reports the whole object with an empty path, which prints as `[]`.
        causes.push(too_long("[]", MAX_DATA_SIZE_BYTES));
    }
}

/// The data keys each built-in Secret type requires, and whether one of them is enough.
fn required_secret_keys(secret_type: &str) -> (&'static [&'static str], bool) {
    match secret_type {
        "kubernetes.io/dockercfg" => (&[".dockercfg"], false),
        "kubernetes.io/dockerconfigjson" => (&[".dockerconfigjson"], false),
        "kubernetes.io/basic-auth" => (&["username", "password"], true),
        "kubernetes.io/ssh-auth" => (&["ssh-privatekey"], false),
        "kubernetes.io/tls" => (&["tls.crt", "tls.key"], false),
        _ => (&[], false),
    }
}

fn validate_secret(secret: &Value, old: Option<&Value>, causes: &mut Vec<FieldCause>) {
    if let Some(old) = old {
        validate_unchanged(&secret["type"], &old["type"], "type", causes);
        validate_immutable_data(secret, old, &["data"], causes);
    }
    let data = &secret["data"];
    let mut total_size = 0;
    for (key, value) in entries(data) {
        push_invalid_each(
            causes,
            &format!("data[{key}]"),
            &go_quote(key),
            config_map_key_errors(key),
        );
        total_size += decoded_base64_length(text(value));
    }
    if total_size > MAX_DATA_SIZE_BYTES {
        causes.push(too_long("data", MAX_DATA_SIZE_BYTES));
    }
    let secret_type = text(&secret["type"]);
    if secret_type == "kubernetes.io/service-account-token"
        && text(&secret["metadata"]["annotations"]["kubernetes.io/service-account.name"]).is_empty()
    {
        causes.push(required(
            "metadata.annotations[kubernetes.io/service-account.name]",
            "",
        ));
    }
    let (keys, any_one_will_do) = required_secret_keys(secret_type);
    let missing: Vec<&&str> = keys
        .iter()
        .filter(|key| data.get(**key).is_none())
        .collect();
    if !any_one_will_do || missing.len() == keys.len() {
        for key in missing {
            causes.push(required(format!("data[{key}]"), ""));
        }
    }
}

// Leases and EndpointSlices.

const ADDRESS_TYPES: [&str; 3] = ["FQDN", "IPv4", "IPv6"];

fn validate_lease(lease: &Value, causes: &mut Vec<FieldCause>) {
    let spec = &lease["spec"];
    if let Some(duration) = spec["leaseDurationSeconds"]
        .as_i64()
        .filter(|duration| *duration <= 0)
    {
        causes.push(invalid(
            "spec.leaseDurationSeconds",
            &duration.to_string(),
            "must be greater than 0",
        ));
    }
    validate_non_negative(&spec["leaseTransitions"], "spec.leaseTransitions", causes);
}

fn validate_endpoint_slice(slice: &Value, old: Option<&Value>, causes: &mut Vec<FieldCause>) {
    validate_enum(&slice["addressType"], "addressType", &ADDRESS_TYPES, causes);
    if let Some(old) = old {
        validate_unchanged(
            &slice["addressType"],
            &old["addressType"],
            "addressType",
            causes,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SUBDOMAIN_MESSAGE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

    /// The causes as `field: message` lines, which is how users read them.
    fn shown(causes: &[FieldCause]) -> Vec<String> {
        causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect()
    }

    fn only_cause(kind: &str, object: &Value, old: Option<&Value>) -> FieldCause {
        let causes = validate(kind, object, old);
        assert_eq!(causes.len(), 1, "{:#?}", shown(&causes));
        causes.into_iter().next().unwrap()
    }

    fn assert_valid(kind: &str, object: &Value, old: Option<&Value>) {
        let causes = validate(kind, object, old);
        assert!(causes.is_empty(), "{kind}: {:#?}", shown(&causes));
    }

    #[test]
    fn name_checkers_follow_upstream() {
        assert!(dns1123_label_errors("my-name-1").is_empty());
        assert_eq!(dns1123_label_errors("a.b"), vec!["must not contain dots"]);
        assert_eq!(dns1123_label_errors("-a").len(), 1);
        assert_eq!(
            dns1123_label_errors(&"a".repeat(64)),
            vec!["must be no more than 63 characters"]
        );
        assert!(dns1123_subdomain_errors("example.com").is_empty());
        assert_eq!(dns1123_subdomain_errors("a..b"), vec![SUBDOMAIN_MESSAGE]);
        assert_eq!(dns1123_subdomain_errors("Foo_Bar"), vec![SUBDOMAIN_MESSAGE]);
        assert!(dns1035_label_errors("web").is_empty());
        assert_eq!(dns1035_label_errors("1web").len(), 1);
        assert!(qualified_name_errors("app.kubernetes.io/name").is_empty());
        assert!(qualified_name_errors("My_Key.1").is_empty());
        assert_eq!(
            qualified_name_errors("/x"),
            vec!["prefix part must be non-empty"]
        );
        assert_eq!(qualified_name_errors("a/b/c").len(), 1);
        assert_eq!(
            qualified_name_errors("x/"),
            vec![
                "name part must be non-empty".to_string(),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName' or 'my.name' or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".to_string(),
            ]
        );
        assert!(label_value_errors("").is_empty());
        assert!(label_value_errors("v1.2_x").is_empty());
        assert_eq!(label_value_errors("-x").len(), 1);
        assert!(port_name_errors("http-alt").is_empty());
        assert_eq!(
            port_name_errors("8080"),
            vec!["must contain at least one letter (a-z)"]
        );
        assert_eq!(
            port_name_errors("a--b"),
            vec!["must not contain consecutive hyphens"]
        );
        assert_eq!(
            port_name_errors("-ab"),
            vec!["must not begin or end with a hyphen"]
        );
        assert_eq!(
            port_name_errors("this-is-too-long-x"),
            vec!["must be no more than 15 characters"]
        );
        assert_eq!(port_name_errors("HTTP").len(), 2);
        assert!(env_var_name_errors("MY_VAR.x-1").is_empty());
        assert_eq!(env_var_name_errors("1X").len(), 1);
        assert_eq!(env_var_name_errors(".."), vec!["must not be '..'"]);
        assert!(config_map_key_errors("app.properties").is_empty());
        assert_eq!(config_map_key_errors("."), vec!["must not be '.'"]);
        assert_eq!(config_map_key_errors("a/b").len(), 1);
    }

    #[test]
    fn go_formatting() {
        assert_eq!(go_quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(
            go_string_map(&json!({"b": "2", "a": "1"})),
            "map[string]string{\"a\":\"1\", \"b\":\"2\"}"
        );
        assert_eq!(go_string_map(&Value::Null), "map[string]string(nil)");
        assert_eq!(
            go_string_slice(&json!(["10.0.0.1"])),
            "[]string{\"10.0.0.1\"}"
        );
        assert_eq!(go_scalar(&json!(8080)), "8080");
    }

    #[test]
    fn metadata_name_is_required_and_checked() {
        let cause = only_cause("ConfigMap", &json!({"metadata": {}}), None);
        assert_eq!(cause.reason, "FieldValueRequired");
        assert_eq!(cause.field, "metadata.name");
        assert_eq!(
            cause.message,
            "Required value: name or generateName is required"
        );

        let cause = only_cause("ConfigMap", &json!({"metadata": {"name": "Foo_Bar"}}), None);
        assert_eq!(cause.reason, "FieldValueInvalid");
        assert_eq!(
            cause.message,
            format!("Invalid value: \"Foo_Bar\": {SUBDOMAIN_MESSAGE}")
        );

        let cause = only_cause("Namespace", &json!({"metadata": {"name": "a.b"}}), None);
        assert_eq!(
            cause.message,
            "Invalid value: \"a.b\": must not contain dots"
        );
        let cause = only_cause(
            "Service",
            &json!({"metadata": {"name": "1st"}, "spec": {"type": "ExternalName", "externalName": "db.example.com", "sessionAffinity": "None"}}),
            None,
        );
        assert_eq!(cause.field, "metadata.name");
        assert!(
            cause
                .message
                .starts_with("Invalid value: \"1st\": a DNS-1035 label")
        );
    }

    #[test]
    fn generate_name_may_end_with_a_dash() {
        assert_valid(
            "Widget",
            &json!({"metadata": {"name": "web-x7k2p", "generateName": "web-"}}),
            None,
        );
        let cause = only_cause(
            "Widget",
            &json!({"metadata": {"name": "x", "generateName": "Web-"}}),
            None,
        );
        assert_eq!(cause.field, "metadata.generateName");
    }

    #[test]
    fn cluster_scoped_kinds_take_no_namespace() {
        let cause = only_cause(
            "Node",
            &json!({"metadata": {"name": "n1", "namespace": "default"}}),
            None,
        );
        assert_eq!(cause.reason, "FieldValueForbidden");
        assert_eq!(cause.field, "metadata.namespace");
        assert_eq!(cause.message, "Forbidden: not allowed on this type");
        assert_valid(
            "Event",
            &json!({"metadata": {"name": "web.17a", "namespace": "default"}}),
            None,
        );
    }

    #[test]
    fn labels_and_annotations() {
        let object = json!({"metadata": {"name": "x", "labels": {"app": "web", "bad key": "ok", "tier": "-x"}}});
        let causes = validate("Widget", &object, None);
        assert_eq!(causes.len(), 2, "{:#?}", shown(&causes));
        assert!(
            causes
                .iter()
                .all(|c| c.field == "metadata.labels" && c.reason == "FieldValueInvalid")
        );
        assert!(
            causes[0]
                .message
                .starts_with("Invalid value: \"bad key\": name part must consist of")
        );
        assert!(
            causes[1]
                .message
                .starts_with("Invalid value: \"-x\": a valid label must be an empty string")
        );

        assert_valid(
            "Widget",
            &json!({"metadata": {"name": "x", "annotations": {"Example.com/Note": "anything at all"}}}),
            None,
        );
        let cause = only_cause(
            "Widget",
            &json!({"metadata": {"name": "x", "annotations": {"a b": ""}}}),
            None,
        );
        assert_eq!(cause.field, "metadata.annotations");
        let big = "x".repeat(TOTAL_ANNOTATION_SIZE_LIMIT_BYTES);
        let cause = only_cause(
            "Widget",
            &json!({"metadata": {"name": "x", "annotations": {"note": big}}}),
            None,
        );
        assert_eq!(cause.reason, "FieldValueTooLong");
        assert_eq!(cause.message, "Too long: must have at most 262144 bytes");
    }

    /// A Pod as the API server holds it after defaulting.
    fn pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "containers": [{
                    "name": "web",
                    "image": "nginx:1.27",
                    "imagePullPolicy": "IfNotPresent",
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
                    "env": [{"name": "MODE", "value": "prod"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "0.1", "memory": "128Mi"}},
                }],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "restartPolicy": "Always",
                "dnsPolicy": "ClusterFirst",
                "terminationGracePeriodSeconds": 30,
                "schedulerName": "default-scheduler",
                "securityContext": {},
                "enableServiceLinks": true,
                "priority": 0,
                "preemptionPolicy": "PreemptLowerPriority",
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                ],
            },
        })
    }

    fn pod_with(change: impl FnOnce(&mut Value)) -> Value {
        let mut pod = pod();
        change(&mut pod);
        pod
    }

    #[test]
    fn quantities_parse_and_print_as_upstream() {
        for (written, canonical) in [
            ("500m", "500m"),
            ("0.5", "500m"),
            ("1000m", "1"),
            ("1", "1"),
            ("100000", "100k"),
            ("128Mi", "128Mi"),
            ("1024Mi", "1Gi"),
            ("1.5Gi", "1536Mi"),
            ("512", "512"),
            ("1e3", "1e3"),
            ("1E6", "1e6"),
            ("12e2", "1200"),
            ("1.5k", "1500"),
            ("0.0000000001", "1n"),
            ("-1", "-1"),
            ("0", "0"),
            ("1M", "1M"),
            ("+2G", "2G"),
        ] {
            let quantity = parse_quantity(written).unwrap_or_else(|e| panic!("{written}: {e}"));
            assert_eq!(quantity.canonical(), canonical, "{written}");
        }
        assert!(parse_quantity("1Gi").unwrap().nanos > parse_quantity("1G").unwrap().nanos);
        assert_eq!(
            parse_quantity("1e3").unwrap().nanos,
            parse_quantity("1k").unwrap().nanos
        );
        assert_eq!(parse_quantity("abc"), Err(QUANTITY_FORMAT_MESSAGE));
        assert_eq!(parse_quantity(""), Err(QUANTITY_FORMAT_MESSAGE));
        assert_eq!(parse_quantity("1.2.3"), Err(QUANTITY_FORMAT_MESSAGE));
        assert_eq!(parse_quantity("1Ki3"), Err(QUANTITY_SUFFIX_MESSAGE));
        assert_eq!(parse_quantity("1x"), Err(QUANTITY_FORMAT_MESSAGE));
    }

    #[test]
    fn defaulted_pod_is_valid() {
        assert_valid("Pod", &pod(), None);
    }

    #[test]
    fn pod_needs_a_container_with_an_image() {
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["containers"] = json!([])),
            None,
        );
        assert_eq!(
            (cause.reason, cause.field.as_str(), cause.message.as_str()),
            ("FieldValueRequired", "spec.containers", "Required value")
        );
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["containers"][0]["image"] = json!("")),
            None,
        );
        assert_eq!(
            (cause.reason, cause.field.as_str(), cause.message.as_str()),
            (
                "FieldValueRequired",
                "spec.containers[0].image",
                "Required value"
            )
        );
    }

    #[test]
    fn container_names_are_labels_unique_across_init_containers() {
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["containers"][0]["name"] = json!("Web")),
            None,
        );
        assert_eq!(cause.field, "spec.containers[0].name");
        assert!(
            cause
                .message
                .starts_with("Invalid value: \"Web\": a lowercase RFC 1123 label must consist of")
        );
        let pod = pod_with(|p| {
            p["spec"]["initContainers"] =
                json!([{"name": "web", "image": "busybox", "imagePullPolicy": "IfNotPresent"}]);
        });
        let cause = only_cause("Pod", &pod, None);
        assert_eq!(cause.reason, "FieldValueDuplicate");
        assert_eq!(cause.field, "spec.initContainers[0].name");
        assert_eq!(cause.message, "Duplicate value: \"web\"");
    }

    #[test]
    fn container_ports() {
        let pod = pod_with(|p| {
            p["spec"]["containers"][0]["ports"] = json!([
                {"name": "http", "containerPort": 80, "protocol": "TCP"},
                {"name": "http", "containerPort": 70000, "hostPort": -1, "protocol": "HTTP"},
                {"name": "8080", "containerPort": 8080, "protocol": "TCP"},
            ]);
        });
        assert_eq!(
            shown(&validate("Pod", &pod, None)),
            vec![
                "spec.containers[0].ports[1].name: Duplicate value: \"http\"",
                "spec.containers[0].ports[1].containerPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
                "spec.containers[0].ports[1].hostPort: Invalid value: -1: must be between 1 and 65535, inclusive",
                "spec.containers[0].ports[1].protocol: Unsupported value: \"HTTP\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
                "spec.containers[0].ports[2].name: Invalid value: \"8080\": must contain at least one letter (a-z)",
            ]
        );
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(0)),
            None,
        );
        assert_eq!(cause.field, "spec.containers[0].ports[0].containerPort");
        assert_eq!(cause.reason, "FieldValueRequired");
    }

    #[test]
    fn env_var_names() {
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["containers"][0]["env"][0]["name"] = json!("1MODE")),
            None,
        );
        assert_eq!(cause.field, "spec.containers[0].env[0].name");
        assert_eq!(
            cause.message,
            "Invalid value: \"1MODE\": a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit (e.g. 'my.env-name' or 'MY_ENV.NAME' or 'MyEnvName1', regex used for validation is '[-._a-zA-Z][-._a-zA-Z0-9]*')"
        );
    }

    #[test]
    fn volume_mounts_name_volumes() {
        let cause = only_cause("Pod", &pod_with(|p| p["spec"]["volumes"] = json!([])), None);
        assert_eq!(cause.reason, "FieldValueNotFound");
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.containers[0].volumeMounts[0].name: Not found: \"data\""
        );
        let pod = pod_with(|p| {
            p["spec"]["volumes"] =
                json!([{"name": "data", "emptyDir": {}}, {"name": "data", "emptyDir": {}}])
        });
        let cause = only_cause("Pod", &pod, None);
        assert_eq!(cause.field, "spec.volumes[1].name");
        assert_eq!(cause.message, "Duplicate value: \"data\"");
        // A mount of an invalid volume is reported too, since that volume does not exist.
        let pod = pod_with(|p| {
            p["spec"]["volumes"][0]["name"] = json!("Data");
            p["spec"]["containers"][0]["volumeMounts"][0]["name"] = json!("Data");
        });
        let fields: Vec<String> = validate("Pod", &pod, None)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            vec![
                "spec.volumes[0].name",
                "spec.containers[0].volumeMounts[0].name"
            ]
        );
    }

    #[test]
    fn pod_policies_take_supported_values() {
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["restartPolicy"] = json!("Sometimes")),
            None,
        );
        assert_eq!(cause.reason, "FieldValueNotSupported");
        assert_eq!(cause.field, "spec.restartPolicy");
        assert_eq!(
            cause.message,
            "Unsupported value: \"Sometimes\": supported values: \"Always\", \"OnFailure\", \"Never\""
        );
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["dnsPolicy"] = json!("Cluster")),
            None,
        );
        assert_eq!(cause.field, "spec.dnsPolicy");
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["containers"][0]["imagePullPolicy"] = json!("Sometimes")),
            None,
        );
        assert_eq!(cause.field, "spec.containers[0].imagePullPolicy");
    }

    #[test]
    fn only_init_containers_take_a_restart_policy_and_only_always() {
        let with_init = |init: Value| pod_with(|p| p["spec"]["initContainers"] = json!([init]));
        assert_valid(
            "Pod",
            &with_init(
                json!({"name": "proxy", "image": "busybox", "imagePullPolicy": "IfNotPresent", "restartPolicy": "Always",
                "startupProbe": {"tcpSocket": {"port": 80}},
                "readinessProbe": {"tcpSocket": {"port": 80}}}),
            ),
            None,
        );
        let cause = only_cause(
            "Pod",
            &with_init(
                json!({"name": "setup", "image": "busybox", "imagePullPolicy": "IfNotPresent", "restartPolicy": "OnFailure"}),
            ),
            None,
        );
        assert_eq!(cause.reason, "FieldValueNotSupported");
        assert_eq!(cause.field, "spec.initContainers[0].restartPolicy");
        assert_eq!(
            cause.message,
            "Unsupported value: \"OnFailure\": supported values: \"Always\""
        );
        let cause = only_cause(
            "Pod",
            &with_init(
                json!({"name": "setup", "image": "busybox", "imagePullPolicy": "IfNotPresent",
                "livenessProbe": {"tcpSocket": {"port": 80}}}),
            ),
            None,
        );
        assert_eq!(cause.field, "spec.initContainers[0].livenessProbe");
        assert_eq!(
            cause.message,
            "Forbidden: may not be set for init containers without restartPolicy=Always"
        );
        let cause = only_cause(
            "Pod",
            &pod_with(|p| p["spec"]["containers"][0]["restartPolicy"] = json!("Always")),
            None,
        );
        assert_eq!(cause.reason, "FieldValueForbidden");
        assert_eq!(cause.field, "spec.containers[0].restartPolicy");
        assert_eq!(
            cause.message,
            "Forbidden: may not be set for non-init containers"
        );
    }

    #[test]
    fn requests_may_not_exceed_limits() {
        let pod = pod_with(
            |p| p["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "500m", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1024Mi"}}),
        );
        let cause = only_cause("Pod", &pod, None);
        assert_eq!(cause.reason, "FieldValueInvalid");
        assert_eq!(cause.field, "spec.containers[0].resources.requests");
        assert_eq!(
            cause.message,
            "Invalid value: \"1\": must be less than or equal to cpu limit of 500m"
        );
        let pod = pod_with(|p| {
            p["spec"]["containers"][0]["resources"] =
                json!({"limits": {"memory": "128Mi"}, "requests": {"memory": "1e9"}})
        });
        assert_eq!(
            only_cause("Pod", &pod, None).message,
            "Invalid value: \"1e9\": must be less than or equal to memory limit of 128Mi"
        );
        let pod = pod_with(|p| {
            p["spec"]["containers"][0]["resources"] =
                json!({"limits": {"example.com/gpu": "2"}, "requests": {"example.com/gpu": "1"}})
        });
        assert_eq!(
            only_cause("Pod", &pod, None).message,
            "Invalid value: \"1\": must be equal to example.com/gpu limit of 2"
        );
        let pod = pod_with(|p| {
            p["spec"]["containers"][0]["resources"] =
                json!({"limits": {"cpu": 2}, "requests": {"cpu": 0.5}})
        });
        assert_valid("Pod", &pod, None);
    }

    #[test]
    fn quantities_must_parse_and_not_be_negative() {
        let pod = pod_with(|p| {
            p["spec"]["containers"][0]["resources"] =
                json!({"limits": {"cpu": "lots"}, "requests": {"memory": "-1Mi"}})
        });
        assert_eq!(
            shown(&validate("Pod", &pod, None)),
            vec![
                "spec.containers[0].resources.limits[cpu]: Invalid value: \"lots\": quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                "spec.containers[0].resources.requests[memory]: Invalid value: \"-1Mi\": must be greater than or equal to 0",
            ]
        );
    }

    #[test]
    fn pod_update_may_change_images_deadline_and_add_tolerations() {
        let old = pod();
        let new = pod_with(|p| {
            p["spec"]["containers"][0]["image"] = json!("nginx:1.28");
            p["spec"]["activeDeadlineSeconds"] = json!(600);
            p["spec"]["tolerations"][0]["tolerationSeconds"] = json!(60);
            p["spec"]["tolerations"]
                .as_array_mut()
                .unwrap()
                .push(json!({"key": "gpu", "operator": "Exists"}));
            p["metadata"]["labels"]["tier"] = json!("front");
        });
        assert_valid("Pod", &new, Some(&old));
    }

    #[test]
    fn pod_update_may_not_change_other_spec_fields() {
        let old = pod();
        let new =
            pod_with(|p| p["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(8080));
        let cause = only_cause("Pod", &new, Some(&old));
        assert_eq!(cause.reason, "FieldValueForbidden");
        assert_eq!(cause.field, "spec");
        assert_eq!(
            cause.message,
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)\nchanged: spec.containers[0].ports[0].containerPort"
        );
    }

    #[test]
    fn pod_update_rules_for_containers_deadline_and_tolerations() {
        let old = pod();
        let new = pod_with(|p| {
            let second = p["spec"]["containers"][0].clone();
            p["spec"]["containers"].as_array_mut().unwrap().push(second);
            p["spec"]["containers"][1]["name"] = json!("sidecar");
        });
        let cause = only_cause("Pod", &new, Some(&old));
        assert_eq!(
            (cause.field.as_str(), cause.message.as_str()),
            (
                "spec.containers",
                "Forbidden: pod updates may not add or remove containers"
            )
        );

        let old = pod_with(|p| p["spec"]["activeDeadlineSeconds"] = json!(60));
        let new = pod_with(|p| p["spec"]["activeDeadlineSeconds"] = json!(120));
        let cause = only_cause("Pod", &new, Some(&old));
        assert_eq!(
            cause.message,
            "Invalid value: 120: must be less than or equal to previous value"
        );
        let cause = only_cause("Pod", &pod(), Some(&old));
        assert_eq!(
            cause.message,
            "Invalid value: null: must not update from a positive integer to nil value"
        );

        let new = pod_with(|p| {
            p["spec"]["tolerations"].as_array_mut().unwrap().pop();
        });
        let cause = only_cause("Pod", &new, Some(&pod()));
        assert_eq!(cause.field, "spec.tolerations");
        assert_eq!(
            cause.message,
            "Forbidden: existing toleration can not be modified except its tolerationSeconds"
        );
    }

    /// A ClusterIP Service as stored after defaulting and address allocation.
    fn service() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "ClusterIP",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                    {"name": "https", "port": 443, "protocol": "TCP", "targetPort": "https"},
                ],
                "clusterIP": "10.96.0.20",
                "clusterIPs": ["10.96.0.20"],
                "sessionAffinity": "None",
                "internalTrafficPolicy": "Cluster",
                "ipFamilyPolicy": "SingleStack",
                "ipFamilies": ["IPv4"],
            },
        })
    }

    fn service_with(change: impl FnOnce(&mut Value)) -> Value {
        let mut service = service();
        change(&mut service);
        service
    }

    #[test]
    fn defaulted_services_are_valid() {
        assert_valid("Service", &service(), None);
        let node_port = service_with(|s| {
            s["spec"]["type"] = json!("NodePort");
            s["spec"]["externalTrafficPolicy"] = json!("Cluster");
            s["spec"]["ports"][0]["nodePort"] = json!(30080);
        });
        assert_valid("Service", &node_port, None);
        let headless = service_with(|s| {
            s["spec"]["clusterIP"] = json!("None");
            s["spec"]["clusterIPs"] = json!(["None"]);
            s["spec"]["ports"] = json!([]);
        });
        assert_valid("Service", &headless, None);
        let external = json!({
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com.", "sessionAffinity": "None"},
        });
        assert_valid("Service", &external, None);
    }

    #[test]
    fn service_ports() {
        let cause = only_cause(
            "Service",
            &service_with(|s| s["spec"]["ports"] = json!([])),
            None,
        );
        assert_eq!(
            (cause.reason, cause.field.as_str()),
            ("FieldValueRequired", "spec.ports")
        );
        let service = service_with(|s| {
            s["spec"]["ports"][0]["port"] = json!(0);
            s["spec"]["ports"][0]["targetPort"] = json!(70000);
            s["spec"]["ports"][1]["name"] = json!("");
            s["spec"]["ports"][1]["protocol"] = json!("ICMP");
            s["spec"]["ports"][1]["targetPort"] = json!("HTTPS");
        });
        assert_eq!(
            shown(&validate("Service", &service, None)),
            vec![
                "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive",
                "spec.ports[0].targetPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
                "spec.ports[1].name: Required value",
                "spec.ports[1].protocol: Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
                "spec.ports[1].targetPort: Invalid value: \"HTTPS\": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
                "spec.ports[1].targetPort: Invalid value: \"HTTPS\": must contain at least one letter (a-z)",
            ]
        );
        let service = service_with(|s| s["spec"]["ports"][1]["name"] = json!("http"));
        let cause = only_cause("Service", &service, None);
        assert_eq!(
            (cause.reason, cause.field.as_str(), cause.message.as_str()),
            (
                "FieldValueDuplicate",
                "spec.ports[1].name",
                "Duplicate value: \"http\""
            )
        );
        let service = service_with(|s| s["spec"]["ports"][1]["port"] = json!(80));
        let cause = only_cause("Service", &service, None);
        assert_eq!(cause.field, "spec.ports[1]");
        assert!(
            cause
                .message
                .starts_with("Duplicate value: core.ServicePort{Name:\"\", Protocol:\"TCP\"")
        );
    }

    #[test]
    fn service_type_and_node_ports() {
        let cause = only_cause(
            "Service",
            &service_with(|s| s["spec"]["type"] = json!("Internal")),
            None,
        );
        assert_eq!(cause.field, "spec.type");
        assert_eq!(
            cause.message,
            "Unsupported value: \"Internal\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
        );
        let cause = only_cause(
            "Service",
            &service_with(|s| s["spec"]["ports"][0]["nodePort"] = json!(30080)),
            None,
        );
        assert_eq!(cause.reason, "FieldValueForbidden");
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"
        );
        let cause = only_cause(
            "Service",
            &service_with(|s| s["spec"]["selector"] = json!({"app": "web!"})),
            None,
        );
        assert_eq!(cause.field, "spec.selector");
        let cause = only_cause(
            "Service",
            &service_with(|s| s["spec"]["sessionAffinity"] = json!("Cookie")),
            None,
        );
        assert_eq!(cause.field, "spec.sessionAffinity");
    }

    #[test]
    fn external_name_services() {
        let external = json!({
            "metadata": {"name": "db"},
            "spec": {"type": "ExternalName", "externalName": "Bad_Name", "sessionAffinity": "None", "clusterIPs": ["10.96.0.1"]},
        });
        let fields: Vec<String> = validate("Service", &external, None)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(fields, vec!["spec.clusterIPs", "spec.externalName"]);
    }

    #[test]
    fn cluster_ip_may_not_change() {
        let old = service();
        let new = service_with(|s| {
            s["spec"]["clusterIP"] = json!("10.96.0.21");
            s["spec"]["clusterIPs"] = json!(["10.96.0.21"]);
        });
        let cause = only_cause("Service", &new, Some(&old));
        assert_eq!(cause.reason, "FieldValueInvalid");
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.clusterIPs[0]: Invalid value: []string{\"10.96.0.21\"}: may not change once set"
        );
        // Leaving the address out keeps it; changing the type to ExternalName drops it.
        let unset = service_with(|s| {
            let spec = s["spec"].as_object_mut().unwrap();
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        });
        assert_valid("Service", &unset, Some(&old));
        let external = json!({
            "metadata": {"name": "web"},
            "spec": {"type": "ExternalName", "externalName": "web.example.com", "sessionAffinity": "None"},
        });
        assert_valid("Service", &external, Some(&old));
    }

    /// The defaulted pod template every workload test uses.
    fn pod_template() -> Value {
        let pod = pod();
        let mut spec = pod["spec"].clone();
        let spec_map = spec.as_object_mut().unwrap();
        // Pod-only defaults are not set on templates.
        for pod_only in [
            "enableServiceLinks",
            "priority",
            "preemptionPolicy",
            "tolerations",
        ] {
            spec_map.remove(pod_only);
        }
        json!({"metadata": {"labels": {"app": "web"}}, "spec": spec})
    }

    fn workload(kind: &str) -> Value {
        let mut spec = json!({
            "selector": {"matchLabels": {"app": "web"}},
            "template": pod_template(),
            "revisionHistoryLimit": 10,
        });
        match kind {
            "Deployment" => {
                spec["replicas"] = json!(3);
                spec["progressDeadlineSeconds"] = json!(600);
                spec["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}});
            }
            "ReplicaSet" => spec["replicas"] = json!(1),
            _ => {
                spec["updateStrategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
            }
        }
        json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "web", "namespace": "default"}, "spec": spec})
    }

    fn workload_with(kind: &str, change: impl FnOnce(&mut Value)) -> Value {
        let mut object = workload(kind);
        change(&mut object);
        object
    }

    const WORKLOADS: [&str; 3] = ["Deployment", "ReplicaSet", "DaemonSet"];

    #[test]
    fn defaulted_workloads_are_valid() {
        for kind in WORKLOADS {
            assert_valid(kind, &workload(kind), None);
            assert_valid(kind, &workload(kind), Some(&workload(kind)));
        }
        let recreate = workload_with("Deployment", |d| {
            d["spec"]["strategy"] = json!({"type": "Recreate"})
        });
        assert_valid("Deployment", &recreate, None);
        let on_delete = workload_with("DaemonSet", |d| {
            d["spec"]["updateStrategy"] = json!({"type": "OnDelete"})
        });
        assert_valid("DaemonSet", &on_delete, None);
        let expressions = workload_with("ReplicaSet", |r| {
            r["spec"]["selector"] = json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}, {"key": "canary", "operator": "DoesNotExist"}]});
        });
        assert_valid("ReplicaSet", &expressions, None);
    }

    #[test]
    fn workload_selector_is_required_and_must_match_the_template() {
        for kind in WORKLOADS {
            let object = workload_with(kind, |w| {
                w["spec"].as_object_mut().unwrap().remove("selector");
            });
            assert_eq!(
                shown(&validate(kind, &object, None)),
                vec![
                    "spec.selector: Required value",
                    "spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"web\"}: `selector` does not match template `labels`",
                ],
                "{kind}"
            );
            let object = workload_with(kind, |w| {
                w["spec"]["template"]["metadata"]["labels"] = json!({"app": "x"})
            });
            let cause = only_cause(kind, &object, None);
            assert_eq!(cause.reason, "FieldValueInvalid");
            assert_eq!(
                format!("{}: {}", cause.field, cause.message),
                "spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"x\"}: `selector` does not match template `labels`"
            );
        }
        let cause = only_cause(
            "ReplicaSet",
            &workload_with("ReplicaSet", |r| r["spec"]["selector"] = json!({})),
            None,
        );
        assert_eq!(
            cause.message,
            "Invalid value: v1.LabelSelector{MatchLabels:map[string]string(nil), MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: empty selector is invalid for deployment"
        );
        let object = workload_with("Deployment", |d| {
            d["spec"]["selector"] =
                json!({"matchExpressions": [{"key": "app", "operator": "Near"}]})
        });
        assert_eq!(
            shown(&validate("Deployment", &object, None)),
            vec![
                "spec.selector.matchExpressions[0].operator: Invalid value: \"Near\": not a valid selector operator",
                "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string(nil), MatchExpressions:[]v1.LabelSelectorRequirement{v1.LabelSelectorRequirement{Key:\"app\", Operator:\"Near\", Values:[]string(nil)}}}: invalid label selector",
            ]
        );
    }

    #[test]
    fn workload_selector_is_immutable() {
        for kind in WORKLOADS {
            let new = workload_with(kind, |w| {
                w["spec"]["selector"] = json!({"matchLabels": {"app": "web", "tier": "front"}});
                w["spec"]["template"]["metadata"]["labels"]["tier"] = json!("front");
            });
            let cause = only_cause(kind, &new, Some(&workload(kind)));
            assert_eq!(
                format!("{}: {}", cause.field, cause.message),
                "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string{\"app\":\"web\", \"tier\":\"front\"}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: field is immutable",
                "{kind}"
            );
        }
    }

    #[test]
    fn workload_replicas_template_and_strategy() {
        let cause = only_cause(
            "Deployment",
            &workload_with("Deployment", |d| d["spec"]["replicas"] = json!(-1)),
            None,
        );
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.replicas: Invalid value: -1: must be greater than or equal to 0"
        );
        let cause = only_cause(
            "ReplicaSet",
            &workload_with("ReplicaSet", |r| {
                r["spec"]["template"]["spec"]["containers"][0]["name"] = json!("")
            }),
            None,
        );
        assert_eq!(
            (cause.field.as_str(), cause.message.as_str()),
            ("spec.template.spec.containers[0].name", "Required value")
        );
        let cause = only_cause(
            "DaemonSet",
            &workload_with("DaemonSet", |d| {
                d["spec"]["template"]["spec"]["restartPolicy"] = json!("Never")
            }),
            None,
        );
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.template.spec.restartPolicy: Unsupported value: \"Never\": supported values: \"Always\""
        );
        let cause = only_cause(
            "Deployment",
            &workload_with("Deployment", |d| {
                d["spec"]["strategy"] = json!({"type": "BlueGreen"})
            }),
            None,
        );
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.strategy: Unsupported value: apps.DeploymentStrategy{Type:\"BlueGreen\", RollingUpdate:(*apps.RollingUpdateDeployment)(nil)}: supported values: \"Recreate\", \"RollingUpdate\""
        );
        let cause = only_cause(
            "DaemonSet",
            &workload_with("DaemonSet", |d| {
                d["spec"]["updateStrategy"] = json!({"type": "Recreate"})
            }),
            None,
        );
        assert_eq!(cause.field, "spec.updateStrategy");
        assert!(
            cause
                .message
                .ends_with("supported values: \"RollingUpdate\", \"OnDelete\"")
        );
        let object = workload_with("Deployment", |d| {
            d["spec"]["strategy"]["rollingUpdate"] = json!({"maxUnavailable": 0, "maxSurge": "0%"})
        });
        let cause = only_cause("Deployment", &object, None);
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.strategy.rollingUpdate.maxUnavailable: Invalid value: intstr.IntOrString{Type:0, IntVal:0, StrVal:\"\"}: may not be 0 when `maxSurge` is 0"
        );
        let object = workload_with("DaemonSet", |d| {
            d["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = json!("10%")
        });
        assert_eq!(
            only_cause("DaemonSet", &object, None).field,
            "spec.updateStrategy.rollingUpdate.maxSurge"
        );
        let object = workload_with("Deployment", |d| {
            d["spec"]["strategy"]["rollingUpdate"]["maxSurge"] = json!("half")
        });
        assert_eq!(
            only_cause("Deployment", &object, None).field,
            "spec.strategy.rollingUpdate.maxSurge"
        );
        let object = workload_with("Deployment", |d| {
            d["spec"]["strategy"] = json!({"type": "Recreate", "rollingUpdate": {}})
        });
        assert_eq!(
            only_cause("Deployment", &object, None).reason,
            "FieldValueForbidden"
        );
    }

    #[test]
    fn config_maps() {
        let config_map = json!({"metadata": {"name": "app", "namespace": "default"}, "data": {"app.properties": "a=1", "MODE": "prod"}, "binaryData": {"logo.png": "iVBORw0KGgo="}});
        assert_valid("ConfigMap", &config_map, None);
        let bad = json!({"metadata": {"name": "app"}, "data": {"..": "y", "a/b": "x", "k": ""}, "binaryData": {"k": ""}});
        assert_eq!(
            shown(&validate("ConfigMap", &bad, None)),
            vec![
                "data[..]: Invalid value: \"..\": must not be '..'",
                "data[a/b]: Invalid value: \"a/b\": a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name' or 'KEY_NAME' or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                "data[k]: Invalid value: \"k\": duplicate of key present in binaryData",
                "binaryData[k]: Invalid value: \"k\": duplicate of key present in data",
            ]
        );
        let big = json!({"metadata": {"name": "app"}, "data": {"a": "x".repeat(MAX_DATA_SIZE_BYTES), "b": "y"}});
        let cause = only_cause("ConfigMap", &big, None);
        assert_eq!(
            (cause.reason, cause.field.as_str(), cause.message.as_str()),
            (
                "FieldValueTooLong",
                "[]",
                "Too long: must have at most 1048576 bytes"
            )
        );
    }

    #[test]
    fn immutable_config_maps_keep_their_data() {
        let old = json!({"metadata": {"name": "app"}, "data": {"a": "1"}, "immutable": true});
        assert_valid("ConfigMap", &old, Some(&old));
        let new = json!({"metadata": {"name": "app"}, "data": {"a": "2"}});
        assert_eq!(
            shown(&validate("ConfigMap", &new, Some(&old))),
            vec![
                "immutable: Forbidden: field is immutable when `immutable` is set",
                "data: Forbidden: field is immutable when `immutable` is set",
            ]
        );
    }

    #[test]
    fn secrets() {
        let secret = json!({"metadata": {"name": "creds", "namespace": "default"}, "type": "Opaque", "data": {"password": "c2VjcmV0"}});
        assert_valid("Secret", &secret, None);
        let tls = json!({"metadata": {"name": "cert"}, "type": "kubernetes.io/tls", "data": {"tls.crt": "Y2VydA=="}});
        let cause = only_cause("Secret", &tls, None);
        assert_eq!(
            (cause.reason, cause.field.as_str(), cause.message.as_str()),
            ("FieldValueRequired", "data[tls.key]", "Required value")
        );
        let basic = json!({"metadata": {"name": "b"}, "type": "kubernetes.io/basic-auth", "data": {"password": ""}});
        assert_valid("Secret", &basic, None);
        let cause = only_cause(
            "Secret",
            &json!({"metadata": {"name": "b"}, "type": "Opaque", "data": {"a b": ""}}),
            None,
        );
        assert_eq!(cause.field, "data[a b]");
        let changed = json!({"metadata": {"name": "creds"}, "type": "kubernetes.io/basic-auth", "data": {"password": "c2VjcmV0"}});
        let cause = only_cause("Secret", &changed, Some(&secret));
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "type: Invalid value: \"kubernetes.io/basic-auth\": field is immutable"
        );
        let token =
            json!({"metadata": {"name": "t"}, "type": "kubernetes.io/service-account-token"});
        assert_eq!(
            only_cause("Secret", &token, None).field,
            "metadata.annotations[kubernetes.io/service-account.name]"
        );
    }

    #[test]
    fn leases() {
        let lease = json!({"metadata": {"name": "node-1", "namespace": "kube-node-lease"}, "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": 40}});
        assert_valid("Lease", &lease, None);
        let lease = json!({"metadata": {"name": "node-1"}, "spec": {"leaseDurationSeconds": 0}});
        let cause = only_cause("Lease", &lease, None);
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0"
        );
    }

    #[test]
    fn endpoint_slices() {
        let slice = json!({"metadata": {"name": "web-abc12", "namespace": "default"}, "addressType": "IPv4", "endpoints": [], "ports": [{"name": "", "port": 80, "protocol": "TCP"}]});
        assert_valid("EndpointSlice", &slice, None);
        let cause = only_cause("EndpointSlice", &json!({"metadata": {"name": "s"}}), None);
        assert_eq!(
            (cause.reason, cause.field.as_str()),
            ("FieldValueRequired", "addressType")
        );
        let cause = only_cause(
            "EndpointSlice",
            &json!({"metadata": {"name": "s"}, "addressType": "IPv5"}),
            None,
        );
        assert_eq!(
            cause.message,
            "Unsupported value: \"IPv5\": supported values: \"FQDN\", \"IPv4\", \"IPv6\""
        );
        let changed = json!({"metadata": {"name": "web-abc12"}, "addressType": "IPv6"});
        let cause = only_cause("EndpointSlice", &changed, Some(&slice));
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "addressType: Invalid value: \"IPv6\": field is immutable"
        );
    }

    #[test]
    fn metadata_only_kinds() {
        let namespace = json!({"metadata": {"name": "team-a", "labels": {"kubernetes.io/metadata.name": "team-a"}}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        assert_valid("Namespace", &namespace, None);
        assert_valid("Namespace", &namespace, Some(&namespace));
        let endpoints = json!({"metadata": {"name": "web", "namespace": "default"}, "subsets": [{"addresses": [{"ip": "10.0.0.5"}], "ports": [{"port": 80, "protocol": "TCP"}]}]});
        assert_valid("Endpoints", &endpoints, None);
        let node = json!({"metadata": {"name": "node-1.example.com"}, "status": {"capacity": {"cpu": "4"}, "allocatable": {"cpu": "4"}}});
        assert_valid("Node", &node, None);
        let event = json!({"metadata": {"name": "web.17a2b3c4d5e6f", "namespace": "default"}, "involvedObject": {"kind": "Pod", "name": "web"}, "reason": "Started"});
        assert_valid("Event", &event, None);
        let account = json!({"metadata": {"name": "builder", "namespace": "default"}});
        assert_valid("ServiceAccount", &account, None);
        let cause = only_cause(
            "ServiceAccount",
            &json!({"metadata": {"name": "Builder"}}),
            None,
        );
        assert_eq!(cause.field, "metadata.name");
    }

    /// A Job as kubectl sends it, defaulted and given its selector as on create.
    fn job_with(change: impl FnOnce(&mut Value)) -> Value {
        let mut template = pod_template();
        template["metadata"] = json!({});
        template["spec"]["restartPolicy"] = json!("Never");
        let mut job = json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "pi", "namespace": "default", "uid": "6f1c2f8e-0d7a-4a57-9b2e-1d3c6a1f0b9e"},
            "spec": {"completions": 3, "parallelism": 2, "template": template},
        });
        change(&mut job);
        crate::api::defaults::apply_defaults("Job", &mut job);
        crate::api::defaults::generate_job_selector(&mut job);
        job
    }

    #[test]
    fn defaulted_jobs_with_a_generated_selector_are_valid() {
        let job = job_with(|_| {});
        assert_valid("Job", &job, None);
        assert_valid("Job", &job, Some(&job));
        let on_failure =
            job_with(|j| j["spec"]["template"]["spec"]["restartPolicy"] = json!("OnFailure"));
        assert_valid("Job", &on_failure, None);
        let manual = job_with(|j| {
            j["spec"]["manualSelector"] = json!(true);
            j["spec"]["selector"] = json!({"matchLabels": {"app": "batch"}});
            j["spec"]["template"]["metadata"]["labels"] = json!({"app": "batch"});
        });
        assert_valid("Job", &manual, None);
    }

    #[test]
    fn job_pods_may_not_restart_always() {
        let job = job_with(|j| j["spec"]["template"]["spec"]["restartPolicy"] = json!("Always"));
        let cause = only_cause("Job", &job, None);
        assert_eq!(cause.reason, "FieldValueNotSupported");
        assert_eq!(
            format!("{}: {}", cause.field, cause.message),
            "spec.template.spec.restartPolicy: Unsupported value: \"Always\": supported values: \"OnFailure\", \"Never\""
        );
    }

    #[test]
    fn job_counts_modes_and_selectors() {
        let job = job_with(|j| j["spec"]["backoffLimit"] = json!(-1));
        assert_eq!(
            shown(&validate("Job", &job, None)),
            vec!["spec.backoffLimit: Invalid value: -1: must be greater than or equal to 0"]
        );
        let job = job_with(|j| {
            j["spec"]["completionMode"] = json!("Indexed");
            j["spec"].as_object_mut().unwrap().remove("completions");
            j["spec"]["parallelism"] = json!(2);
        });
        assert_eq!(
            shown(&validate("Job", &job, None)),
            vec!["spec.completions: Required value: when completion mode is Indexed"]
        );
        let mut job = job_with(|_| {});
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"] =
            json!("other");
        let causes = shown(&validate("Job", &job, None));
        assert!(
            causes
                .iter()
                .any(|c| c.starts_with("spec.selector.matchLabels: ")
                    && c.ends_with("`selector` not auto-generated")),
            "{causes:#?}"
        );
        let manual = job_with(|j| {
            j["spec"]["manualSelector"] = json!(true);
            j["spec"]["selector"] = json!({"matchLabels": {"app": "batch"}});
            j["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
        });
        assert_eq!(
            shown(&validate("Job", &manual, None)),
            vec![
                "spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"other\"}: `selector` does not match template `labels`"
            ]
        );
    }

    #[test]
    fn job_selector_template_and_completions_are_immutable() {
        let old = job_with(|_| {});
        let mut new = old.clone();
        new["spec"]["template"]["spec"]["containers"][0]["image"] = json!("busybox:2");
        assert_eq!(
            shown(&validate("Job", &new, Some(&old))),
            vec!["spec.template: Invalid value: core.PodTemplateSpec{...}: field is immutable"]
        );
        let mut new = old.clone();
        new["spec"]["completions"] = json!(4);
        assert_eq!(
            shown(&validate("Job", &new, Some(&old))),
            vec!["spec.completions: Invalid value: 4: field is immutable"]
        );
        // What may change: parallelism, suspend, the deadline, the status.
        let mut new = old.clone();
        new["spec"]["parallelism"] = json!(5);
        new["spec"]["suspend"] = json!(true);
        new["spec"]["activeDeadlineSeconds"] = json!(60);
        new["status"] = json!({"active": 2});
        assert_valid("Job", &new, Some(&old));
    }

    #[test]
    fn a_suspended_job_that_never_started_may_move_its_pods() {
        let old = job_with(|j| j["spec"]["suspend"] = json!(true));
        let mut new = old.clone();
        new["spec"]["template"]["spec"]["nodeSelector"] = json!({"zone": "b"});
        new["spec"]["template"]["metadata"]["labels"]["queue"] = json!("batch");
        assert_valid("Job", &new, Some(&old));
        // Not its containers, and not once it ran.
        let mut image = new.clone();
        image["spec"]["template"]["spec"]["containers"][0]["image"] = json!("busybox:2");
        assert_eq!(validate("Job", &image, Some(&old)).len(), 1);
        let mut started = old.clone();
        started["status"]["startTime"] = json!("2026-11-23T08:00:00Z");
        assert_eq!(validate("Job", &new, Some(&started)).len(), 1);
    }
}
