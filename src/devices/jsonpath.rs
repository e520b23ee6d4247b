//! The JSONPath subset device templates use (RFC 9535 syntax): `$`, member names (`.name`,
//! `['name']`), array indexes (`[0]`, `[-1]`), wildcards (`.*`, `[*]`) and descendants
//! (`..name`). Compiled once when a template loads; selecting never fails.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Name(String),
    Index(i64),
    Wildcard,
    Descendant(String),
}

/// A compiled path.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

impl JsonPath {
    pub fn compile(text: &str) -> Result<JsonPath, String> {
        let bad = |why: &str| format!("JSONPath {text:?}: {why}");
        let rest = text
            .strip_prefix('$')
            .ok_or_else(|| bad("must start with $"))?;
        let chars: Vec<char> = rest.chars().collect();
        let mut steps = Vec::new();
        let mut i = 0;
        let name_at = |i: &mut usize| -> String {
            let start = *i;
            while *i < chars.len()
                && (chars[*i].is_alphanumeric() || matches!(chars[*i], '_' | '-' | '@'))
            {
                *i += 1;
            }
            chars[start..*i].iter().collect()
        };
        while i < chars.len() {
            match chars[i] {
                '.' if chars.get(i + 1) == Some(&'.') => {
                    i += 2;
                    let name = name_at(&mut i);
                    if name.is_empty() {
                        return Err(bad("`..` needs a member name"));
                    }
                    steps.push(Step::Descendant(name));
                }
                '.' => {
                    i += 1;
                    if chars.get(i) == Some(&'*') {
                        i += 1;
                        steps.push(Step::Wildcard);
                        continue;
                    }
                    let name = name_at(&mut i);
                    if name.is_empty() {
                        return Err(bad("`.` needs a member name"));
                    }
                    steps.push(Step::Name(name));
                }
                '[' => {
                    let close = chars[i..]
                        .iter()
                        .position(|c| *c == ']')
                        .map(|p| p + i)
                        .ok_or_else(|| bad("unclosed ["))?;
                    let inner: String = chars[i + 1..close].iter().collect();
                    let inner = inner.trim();
                    if inner == "*" {
                        steps.push(Step::Wildcard);
                    } else if let Some(q) = inner
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    {
                        steps.push(Step::Name(q.to_string()));
                    } else {
                        let n: i64 = inner.parse().map_err(|_| {
                            bad(&format!("[{inner}] is not an index, * or a quoted name"))
                        })?;
                        steps.push(Step::Index(n));
                    }
                    i = close + 1;
                }
                c => return Err(bad(&format!("unexpected {c:?}"))),
            }
        }
        Ok(JsonPath {
            text: text.to_string(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Every value the path selects, in document order.
    pub fn select<'a>(&self, root: &'a Value) -> Vec<&'a Value> {
        let mut current = vec![root];
        for step in &self.steps {
            let mut next = Vec::new();
            for v in current {
                match step {
                    Step::Name(n) => next.extend(v.get(n.as_str())),
                    Step::Index(k) => {
                        if let Some(a) = v.as_array() {
                            let idx = if *k < 0 { a.len() as i64 + k } else { *k };
                            if let Ok(idx) = usize::try_from(idx) {
                                next.extend(a.get(idx));
                            }
                        }
                    }
                    Step::Wildcard => match v {
                        Value::Array(a) => next.extend(a.iter()),
                        Value::Object(o) => next.extend(o.values()),
                        _ => {}
                    },
                    Step::Descendant(n) => descendants(v, n, &mut next),
                }
            }
            current = next;
        }
        current
    }

    /// The first selected value that is not `null`.
    pub fn first<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.select(root).into_iter().find(|v| !v.is_null())
    }
}

fn descendants<'a>(v: &'a Value, name: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(o) => {
            if let Some(x) = o.get(name) {
                out.push(x);
            }
            for child in o.values() {
                descendants(child, name, out);
            }
        }
        Value::Array(a) => {
            for child in a {
                descendants(child, name, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selects_members_indexes_wildcards_and_descendants() {
        let v = json!({"a": {"b": [1, 2, 3], "c d": true}, "x": [{"y": 1}, {"y": 2}]});
        let sel = |p: &str| {
            JsonPath::compile(p)
                .unwrap()
                .select(&v)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(sel("$.a.b[0]"), vec![json!(1)]);
        assert_eq!(sel("$.a.b[-1]"), vec![json!(3)]);
        assert_eq!(sel("$.a['c d']"), vec![json!(true)]);
        assert_eq!(sel("$.x[*].y"), vec![json!(1), json!(2)]);
        assert_eq!(sel("$..y"), vec![json!(1), json!(2)]);
        assert_eq!(sel("$.missing.z"), Vec::<Value>::new());
        assert_eq!(sel("$"), vec![v.clone()]);
    }

    #[test]
    fn refuses_malformed_paths() {
        for p in ["a.b", "$.", "$[", "$[x]", "$..", "$ a"] {
            assert!(JsonPath::compile(p).is_err(), "{p}");
        }
    }
}
