//! Label and field selectors: parsing the query-string syntax and matching objects.

use std::borrow::Cow;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    GreaterThan(i64),
    LessThan(i64),
}

#[derive(Debug, Clone, PartialEq)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&input[start..]);
    parts
}

fn parse_value_set(rest: &str, whole: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            format!("unable to parse requirement: found '{rest}', expected: '(' in \"{whole}\"")
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 316
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if input.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for part in split_top_level(input) {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!(
                    "unable to parse requirement: empty requirement in \"{input}\""
                ));
            }
            let requirement = if let Some(key) = part.strip_prefix('!') {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::DoesNotExist,
                }
            } else if let Some((key, value)) = part.split_once("!=") {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::NotEquals(value.trim().to_string()),
                }
            } else if let Some((key, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::Equals(value.trim().to_string()),
                }
            } else if let Some((key, rest)) = part.split_once(" notin ") {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::NotIn(parse_value_set(rest, input)?),
                }
            } else if let Some((key, rest)) = part.split_once(" in ") {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::In(parse_value_set(rest, input)?),
                }
            } else if let Some((key, value)) = part.split_once('>') {
                let number = value.trim().parse().map_err(|_| {
                    format!("unable to parse requirement: for 'gt', 'lt' operators, the value must be an integer: \"{part}\"")
                })?;
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::GreaterThan(number),
                }
            } else if let Some((key, value)) = part.split_once('<') {
                let number = value.trim().parse().map_err(|_| {
                    format!("unable to parse requirement: for 'gt', 'lt' operators, the value must be an integer: \"{part}\"")
                })?;
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::LessThan(number),
                }
            } else {
                LabelRequirement {
                    key: part.to_string(),
                    op: LabelOp::Exists,
                }
            };
            if !valid_label_key(&requirement.key) {
                return Err(format!(
                    "unable to parse requirement: invalid label key \"{}\" in \"{input}\"",
                    requirement.key
                ));
            }
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether `object`'s `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        self.matches_labels(|key| labels.and_then(|l| l.get(key)).and_then(Value::as_str))
    }

    pub fn matches_labels<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.requirements.iter().all(|r| {
            let value = label(&r.key);
            match &r.op {
                LabelOp::Equals(want) => value == Some(want.as_str()),
                LabelOp::NotEquals(want) => value != Some(want.as_str()),
                LabelOp::In(set) => value.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => value.is_none_or(|v| !set.iter().any(|s| s == v)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
                LabelOp::GreaterThan(n) => value
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                LabelOp::LessThan(n) => value
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
struct FieldRequirement {
    field: String,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector`, checked against the fields a resource supports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// Parses `input`; `supported` lists the resource's selectable fields beyond
    /// `metadata.name` and `metadata.namespace`.
    pub fn parse(input: &str, supported: &[&str]) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if input.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for part in input.split(',') {
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{input}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if field != "metadata.name"
                && field != "metadata.namespace"
                && !supported.contains(&field)
            {
                return Err(format!("field label not supported: {field}"));
            }
            requirements.push(FieldRequirement {
                field: field.to_string(),
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The value required for `field` by an equality requirement, if there is one; lets a
    /// caller narrow a list (`metadata.name=x` is one key).
    pub fn required_value(&self, field: &str) -> Option<&str> {
        self.requirements
            .iter()
            .find(|r| r.equal && r.field == field)
            .map(|r| r.value.as_str())
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.matches_with(|field| field_value(object, field))
    }

    /// Whether the fields `value` gives (as [`field_value`] would) satisfy every
    /// requirement; lets a caller match on fields it extracted once.
    pub fn matches_with<'a, S: AsRef<str> + 'a>(&self, value: impl Fn(&str) -> S) -> bool {
        self.requirements
            .iter()
            .all(|r| (value(&r.field).as_ref() == r.value) == r.equal)
    }
}

/// A field's value as field selectors compare it: strings as they are, booleans and numbers
/// printed, missing fields as the empty string (or "false" for booleans Kubernetes defaults).
pub fn field_value<'a>(object: &'a Value, field: &str) -> Cow<'a, str> {
    let mut value = Some(object);
    for part in field.split('.') {
        value = value.and_then(|v| v.get(part));
    }
    match value {
        Some(Value::String(s)) => Cow::Borrowed(s),
        Some(Value::Bool(b)) => Cow::Owned(b.to_string()),
        Some(Value::Number(n)) => Cow::Owned(n.to_string()),
        _ if matches!(field, "spec.unschedulable" | "spec.hostNetwork") => Cow::Borrowed("false"),
        _ => Cow::Borrowed(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"labels": labels}})
    }

    #[test]
    fn label_selector_operators() {
        let object = labelled(json!({"app": "web", "tier": "front", "rank": "3"}));
        for (selector, expected) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=web,tier=back", false),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("env notin (prod)", true),
            ("tier", true),
            ("!tier", false),
            ("!env", true),
            ("rank>2", true),
            ("rank<2", false),
            ("app in (web,api),tier", true),
        ] {
            let parsed = LabelSelector::parse(selector).unwrap();
            assert_eq!(parsed.matches(&object), expected, "{selector}");
        }
    }

    #[test]
    fn label_selector_errors_name_the_problem() {
        assert!(
            LabelSelector::parse("app in web")
                .unwrap_err()
                .contains("expected: '('")
        );
        assert!(
            LabelSelector::parse("a b=c")
                .unwrap_err()
                .contains("invalid label key")
        );
        assert!(
            LabelSelector::parse("rank>x")
                .unwrap_err()
                .contains("must be an integer")
        );
    }

    #[test]
    fn field_selector_checks_support_and_matches() {
        let supported = ["spec.nodeName", "status.phase", "spec.unschedulable"];
        let pod = json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let selector =
            FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed", &supported).unwrap();
        assert!(selector.matches(&pod));
        assert_eq!(selector.required_value("spec.nodeName"), Some("n1"));
        assert!(
            !FieldSelector::parse("spec.nodeName=", &supported)
                .unwrap()
                .matches(&pod)
        );
        assert!(
            FieldSelector::parse("spec.unschedulable=false", &supported)
                .unwrap()
                .matches(&json!({}))
        );
        assert_eq!(
            FieldSelector::parse("spec.bogus=1", &supported).unwrap_err(),
            "field label not supported: spec.bogus"
        );
    }
}
