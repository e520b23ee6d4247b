//! FHIRPath (http://hl7.org/fhirpath/N1/, as profiled by FHIR R4 search.html#fhirpath) for search-parameter expressions.
//!
//! This is deliberately not a general FHIRPath engine. It implements exactly the subset the
//! 1,372 expressions of the official R4 SearchParameters use, evaluated directly over
//! `&serde_json::Value` so that indexing a resource borrows instead of copying:
//!
//! - paths starting with a type name (`Observation.code`; `Resource` and `DomainResource`
//!   match any resource), `%resource`, `$this`, parentheses, `[n]` indexing;
//! - `|` (union), `=`, `!=`, `and`;
//! - `where(criteria)`, `exists()`, `resolve() is T`, `x as T`, `.as(T)`, `.ofType(T)`, `is T`,
//!   `extension(url)`;
//! - string and boolean literals (strings only as an operand of `=` / `!=`).
//!
//! Anything else is refused by [`parse`] with a message naming the construct, so a custom
//! SearchParameter using it is rejected when it is loaded rather than silently indexing nothing.
//!
//! Semantics worth knowing:
//! - `|` removes duplicates by value, as FHIRPath says, also within one branch.
//! - Types are known for choice elements (from the JSON key) and resources (from
//!   `resourceType`) only, so `is`/`as` on any other element is false/empty.
//! - `resolve() is T` reads the type from the reference text (`T/id`, `T/id/_history/v`,
//!   absolute URLs ending so, `#id` for contained resources), else from `Reference.type`.
//!
//! Architecture invariant: evaluation never errors and never panics. Where strict FHIRPath
//! would raise an error at run time (for example `as` applied to several items, which happens
//! with `Observation.component.value`), this evaluator filters or yields an empty collection,
//! because a search index must be built for every stored resource.

use serde_json::Value;
use std::fmt;

/// One item of a FHIRPath collection: a borrowed JSON value and, when known, its FHIR type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Node<'a> {
    pub value: &'a Value,
    /// Known only when the JSON key was a choice element (`valueQuantity` gives `Quantity`),
    /// which is also how `as`/`ofType` narrowed it. Plain JSON does not say whether an object
    /// is a `HumanName` or an `Address`; the index extractor infers that from the shape.
    pub fhir_type: Option<&'static str>,
}

/// Why an expression was refused, with the byte offset in the source where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirPathError {
    pub message: String,
    pub position: usize,
}

impl fmt::Display for FhirPathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at offset {})", self.message, self.position)
    }
}

impl std::error::Error for FhirPathError {}

/// A parsed expression. Parse once when a SearchParameter is loaded, evaluate on every write.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    ast: Ast,
}

// Booleans produced by `exists()`, `=`, `and`, `is` are not part of the resource, so they
// borrow from these statics; `'static` outlives any resource lifetime.
static TRUE: Value = Value::Bool(true);
static FALSE: Value = Value::Bool(false);

fn bool_node(b: bool) -> Node<'static> {
    Node {
        value: if b { &TRUE } else { &FALSE },
        fhir_type: Some("boolean"),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Ast {
    Path {
        start: Start,
        steps: Vec<Step>,
    },
    Union(Vec<Ast>),
    Equals {
        left: Box<Ast>,
        right: Box<Ast>,
        negate: bool,
    },
    And(Box<Ast>, Box<Ast>),
    Is {
        operand: Box<Ast>,
        type_name: String,
    },
    /// `input.exists()`: a separate node because a path stops at its first empty step, yet
    /// `exists()` on nothing must answer false.
    Exists(Box<Ast>),
    /// `refs.resolve() is T`: answered from the reference text, as there is no database here.
    ResolveIs {
        refs: Box<Ast>,
        type_name: String,
    },
    /// Stored as a `Value` so that `=` compares it like any other JSON value.
    StringLiteral(Value),
    BoolLiteral(bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Start {
    /// The focus item (`$this`, or implicit at the start of a relative path such as `type` in `where(type='x')`).
    Focus,
    /// `%resource`: the resource being indexed, even inside `where()`.
    Resource,
    /// A leading type name (`Patient.name`): the focus if it is a resource of that type, else nothing.
    TypeName(String),
    Expr(Box<Ast>),
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// An element name, with the types it may carry as a choice element (looked up once,
    /// at parse time, in [`CHOICE_ELEMENTS`]).
    Member {
        name: String,
        choice: Option<&'static [&'static str]>,
    },
    Index(usize),
    Where(Box<Ast>),
    /// `as T` (operator or function) and `ofType(T)`: keep the items of that type.
    OfType(String),
    /// `extension(url)`: the items' extensions with that url.
    Extension(String),
    /// Only valid directly before `is`; [`parse`] turns that pair into [`Ast::ResolveIs`].
    /// Carries its source offset for the error when it stands anywhere else.
    Resolve(usize),
}

/// Parses a FHIRPath expression, refusing anything outside the supported subset.
pub fn parse(src: &str) -> Result<Expr, FhirPathError> {
    let tokens = lex(src)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        depth: 0,
    };
    let ast = parser.expression()?;
    let token = parser.peek();
    if token.kind != Tok::Eof {
        return Err(FhirPathError {
            message: format!("unexpected {} after the end of the expression", token.kind),
            position: token.position,
        });
    }
    check_resolve(&ast)?;
    Ok(Expr { ast })
}

impl Expr {
    /// Adds to `out` the top-level elements of a `resource_type` resource the expression
    /// can read, as (name, is a choice element: `name[Type]` too), so a caller may parse only
    /// those; `None` when that cannot be told (an expression that navigates from the
    /// resource in a way not followed here). Branches for other types read nothing.
    pub fn root_fields<'a>(
        &'a self,
        resource_type: &str,
        out: &mut Vec<(&'a str, bool)>,
    ) -> Option<()> {
        root_fields(&self.ast, true, resource_type, out)
    }

    /// The branches of a top-level union (`A.x | A.y`; one branch when there is no union),
    /// each with the type name its path starts from; `None` when a branch starts elsewhere
    /// (`%resource`, a literal, `$this`), so its reach cannot be told by its root.
    pub fn rooted_branches(&self) -> Option<Vec<(&str, Expr)>> {
        fn root(ast: &Ast) -> Option<&str> {
            match ast {
                Ast::Path {
                    start: Start::TypeName(t),
                    ..
                } => Some(t),
                Ast::Path {
                    start: Start::Expr(inner),
                    ..
                } => root(inner),
                _ => None,
            }
        }
        let branches = match &self.ast {
            Ast::Union(branches) => branches.as_slice(),
            single => std::slice::from_ref(single),
        };
        branches
            .iter()
            .map(|b| Some((root(b)?, Expr { ast: b.clone() })))
            .collect()
    }

    /// Evaluates against a resource, which is both the focus and `%resource`.
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<Node<'a>> {
        let focus = Node {
            value: resource,
            fhir_type: None,
        };
        self.evaluate_with_focus(focus, resource)
    }

    /// Evaluates with an explicit focus, as composite components are evaluated relative to
    /// each item of the composite's own expression (`%resource` still means the resource).
    pub fn evaluate_with_focus<'a>(&self, focus: Node<'a>, resource: &'a Value) -> Vec<Node<'a>> {
        self.evaluate_in(focus, resource, resource_type(resource))
    }

    /// [`Expr::evaluate`] for a caller that already knows the resource type, which saves a
    /// lookup per parameter when indexing one resource with many parameters.
    pub(crate) fn evaluate_in<'a>(
        &self,
        focus: Node<'a>,
        resource: &'a Value,
        resource_type: Option<&'a str>,
    ) -> Vec<Node<'a>> {
        let root = Root {
            value: resource,
            resource_type,
        };
        let mut out = Vec::new();
        eval(&self.ast, focus, root, &mut out);
        out
    }
}

/// `%resource`, with its type looked up once per evaluation.
/// Collects into `out` the top-level elements `ast` reads; `at_root`: the focus is the
/// resource itself (the top of the expression, not inside `where`).
fn root_fields<'a>(
    ast: &'a Ast,
    at_root: bool,
    ty: &str,
    out: &mut Vec<(&'a str, bool)>,
) -> Option<()> {
    match ast {
        Ast::Path { start, steps } => {
            let from_root = match start {
                Start::Resource => true,
                // `Observation.code` yields nothing on a Patient.
                Start::TypeName(t) if at_root && !resource_type_matches(ty, t) => return Some(()),
                Start::TypeName(_) => true,
                Start::Focus => at_root,
                Start::Expr(inner) => {
                    root_fields(inner, at_root, ty, out)?;
                    false
                }
            };
            if from_root {
                match steps.first() {
                    Some(Step::Member { name, choice }) => out.push((name, choice.is_some())),
                    Some(Step::Extension(_)) => out.push(("extension", false)),
                    // The resource itself, filtered or indexed: anything may be read.
                    Some(_) => return None,
                    None => {}
                }
            }
            // Criteria inside `where` start from their own focus; `%resource` in them is
            // a path from the root like any other.
            for step in steps {
                if let Step::Where(criteria) = step {
                    root_fields(criteria, false, ty, out)?;
                }
            }
            Some(())
        }
        Ast::Union(parts) => parts
            .iter()
            .try_for_each(|p| root_fields(p, at_root, ty, out)),
        Ast::Equals { left, right, .. } | Ast::And(left, right) => {
            root_fields(left, at_root, ty, out)?;
            root_fields(right, at_root, ty, out)
        }
        Ast::Is { operand, .. } | Ast::Exists(operand) => root_fields(operand, at_root, ty, out),
        Ast::ResolveIs { refs, .. } => root_fields(refs, at_root, ty, out),
        Ast::StringLiteral(_) | Ast::BoolLiteral(_) => Some(()),
    }
}

#[derive(Clone, Copy)]
struct Root<'a> {
    value: &'a Value,
    resource_type: Option<&'a str>,
}

// ---------------------------------------------------------------------------------------
// Evaluation

fn eval<'a>(ast: &Ast, focus: Node<'a>, root: Root<'a>, out: &mut Vec<Node<'a>>) {
    match ast {
        Ast::Path { start, steps } => eval_path(start, steps, focus, root, out),
        Ast::Union(branches) => {
            let first = out.len();
            for branch in branches {
                eval(branch, focus, root, out);
            }
            // FHIRPath `|` merges and removes duplicates by value, also within one branch
            // (a given name that repeats across a patient's names counts once).
            if out.len() - first > 1 {
                dedupe(out, first);
            }
        }
        Ast::Equals {
            left,
            right,
            negate,
        } => {
            if let Some(equal) = equals(left, right, focus, root) {
                out.push(bool_node(equal != *negate));
            }
        }
        Ast::And(left, right) => {
            let l = eval_bool(left, focus, root);
            // Short-circuit like the three-valued `and`: false wins regardless of the other side.
            if l == Some(false) {
                out.push(bool_node(false));
                return;
            }
            match (l, eval_bool(right, focus, root)) {
                (_, Some(false)) => out.push(bool_node(false)),
                (Some(true), Some(true)) => out.push(bool_node(true)),
                _ => {}
            }
        }
        Ast::Is { operand, type_name } => {
            let items = eval_vec(operand, focus, root);
            // Strict FHIRPath errors on more than one item; an empty result is our "error".
            if let [item] = items.as_slice() {
                out.push(bool_node(node_is(item, type_name)));
            }
        }
        Ast::ResolveIs { refs, type_name } => {
            let items = eval_vec(refs, focus, root);
            if let [item] = items.as_slice() {
                // An unresolvable reference makes `resolve()` empty, and `is` on empty is empty.
                if let Some(target) = reference_target_type(item.value, root) {
                    out.push(bool_node(resource_type_matches(target, type_name)));
                }
            }
        }
        Ast::Exists(inner) => {
            let mut items = Vec::new();
            eval(inner, focus, root, &mut items);
            out.push(bool_node(!items.is_empty()));
        }
        Ast::BoolLiteral(b) => out.push(bool_node(*b)),
        // The parser only lets string literals appear as operands of `=`/`!=`, which compare
        // them in `equals` without turning them into nodes (they do not live as long as `'a`).
        Ast::StringLiteral(_) => {}
    }
}

fn eval_vec<'a>(ast: &Ast, focus: Node<'a>, root: Root<'a>) -> Vec<Node<'a>> {
    let mut out = Vec::new();
    eval(ast, focus, root, &mut out);
    out
}

/// FHIRPath singleton evaluation of collections as booleans: empty is unknown, one boolean
/// is itself, one other item is true; several items would be an error, so unknown.
fn eval_bool(ast: &Ast, focus: Node<'_>, root: Root<'_>) -> Option<bool> {
    let items = eval_vec(ast, focus, root);
    match items.as_slice() {
        [item] => Some(item.value.as_bool().unwrap_or(true)),
        _ => None,
    }
}

fn equals(left: &Ast, right: &Ast, focus: Node<'_>, root: Root<'_>) -> Option<bool> {
    let l = operand(left, focus, root);
    let r = operand(right, focus, root);
    let (l, r) = (l.as_slice(), r.as_slice());
    if l.is_empty() || r.is_empty() {
        return None;
    }
    Some(l.len() == r.len() && l.iter().zip(r).all(|(a, b)| json_equal(a, b)))
}

fn operand<'s>(ast: &'s Ast, focus: Node<'s>, root: Root<'s>) -> Vec<&'s Value> {
    match ast {
        Ast::StringLiteral(v) => vec![v],
        _ => eval_vec(ast, focus, root)
            .into_iter()
            .map(|n| n.value)
            .collect(),
    }
}

/// JSON equality, except that numbers compare by value (`1` equals `1.0`).
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn dedupe(out: &mut Vec<Node<'_>>, first: usize) {
    let mut kept = first;
    for i in first..out.len() {
        let candidate = out[i];
        let seen = out[first..kept].iter().any(|n| {
            std::ptr::eq(n.value, candidate.value) || json_equal(n.value, candidate.value)
        });
        if !seen {
            out[kept] = candidate;
            kept += 1;
        }
    }
    out.truncate(kept);
}

fn eval_path<'a>(
    start: &Start,
    steps: &[Step],
    focus: Node<'a>,
    root: Root<'a>,
    out: &mut Vec<Node<'a>>,
) {
    let mut current: Vec<Node<'a>> = Vec::new();
    match start {
        Start::Focus => current.push(focus),
        Start::Resource => current.push(Node {
            value: root.value,
            fhir_type: None,
        }),
        Start::TypeName(name) => {
            // The usual focus is the resource itself, whose type is known without a lookup;
            // this check runs once per `|` branch, and unions have up to 32 branches.
            let focus_type = if std::ptr::eq(focus.value, root.value) {
                root.resource_type
            } else {
                resource_type(focus.value)
            };
            if focus_type.is_some_and(|rt| resource_type_matches(rt, name)) {
                current.push(focus);
            }
        }
        Start::Expr(inner) => eval(inner, focus, root, &mut current),
    }
    let mut next: Vec<Node<'a>> = Vec::new();
    for step in steps {
        if current.is_empty() {
            return;
        }
        next.clear();
        match step {
            Step::Member { name, choice } => {
                for node in &current {
                    member(node.value, name, *choice, &mut next);
                }
            }
            Step::Index(i) => {
                if let Some(node) = current.get(*i) {
                    next.push(*node);
                }
            }
            Step::Where(criteria) => {
                for node in &current {
                    if eval_bool(criteria, *node, root) == Some(true) {
                        next.push(*node);
                    }
                }
            }
            Step::OfType(type_name) => {
                next.extend(current.iter().filter(|n| node_is(n, type_name)));
            }
            Step::Extension(url) => {
                let mut all = Vec::new();
                for node in &current {
                    member(node.value, "extension", None, &mut all);
                }
                next.extend(
                    all.into_iter().filter(|n| {
                        n.value.get("url").and_then(Value::as_str) == Some(url.as_str())
                    }),
                );
            }
            // Rejected by `check_resolve` at parse time; nothing sensible to yield.
            Step::Resolve(_) => {}
        }
        std::mem::swap(&mut current, &mut next);
    }
    out.append(&mut current);
}

/// Navigates one member name, flattening arrays and matching choice elements (`value` finds
/// `valueQuantity`). Keys starting with `_` (primitive extensions) are never names, so they
/// are ignored naturally.
fn member<'a>(
    value: &'a Value,
    name: &str,
    choice: Option<&'static [&'static str]>,
    out: &mut Vec<Node<'a>>,
) {
    let Value::Object(map) = value else {
        return;
    };
    // FHIR objects are small; comparing keys in order (length first) is cheaper than
    // hashing the name, and one pass also finds a choice element's typed key.
    if map.len() > 24 {
        if let Some(v) = map.get(name) {
            push_flattened(v, None, out);
            return;
        }
        if choice.is_none() {
            return;
        }
    }
    let mut typed = None;
    for (key, v) in map {
        if key == name {
            push_flattened(v, None, out);
            return;
        }
        if typed.is_none()
            && let Some(types) = choice
            && let Some(suffix) = key.strip_prefix(name)
            && let Some(t) = types.iter().find(|t| is_type_suffix(suffix, t))
        {
            typed = Some((v, *t));
        }
    }
    // A choice element has one value, so the first typed key is the only one.
    if let Some((v, t)) = typed {
        push_flattened(v, Some(t), out);
    }
}

/// `map.get(name)`, by comparing keys in order for the small objects FHIR consists of, which
/// is cheaper than hashing the name.
pub(crate) fn field<'a>(map: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    if map.len() > 24 {
        return map.get(name);
    }
    map.iter().find(|(key, _)| *key == name).map(|(_, v)| v)
}

fn push_flattened<'a>(v: &'a Value, fhir_type: Option<&'static str>, out: &mut Vec<Node<'a>>) {
    match v {
        Value::Array(items) => out.extend(
            items
                .iter()
                .filter(|i| !i.is_null())
                .map(|value| Node { value, fhir_type }),
        ),
        Value::Null => {}
        value => out.push(Node { value, fhir_type }),
    }
}

/// `Quantity` in the key `valueQuantity`, `dateTime` in `valueDateTime`: the type name with
/// its first letter upper-cased.
fn is_type_suffix(suffix: &str, type_name: &str) -> bool {
    let mut s = suffix.chars();
    let mut t = type_name.chars();
    match (s.next(), t.next()) {
        (Some(a), Some(b)) => a == b.to_ascii_uppercase() && s.as_str() == t.as_str(),
        _ => false,
    }
}

fn choice_types(name: &str) -> Option<&'static [&'static str]> {
    CHOICE_ELEMENTS
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .and_then(|i| CHOICE_ELEMENTS.get(i))
        .map(|(_, types)| *types)
}

fn resource_type(v: &Value) -> Option<&str> {
    v.get("resourceType").and_then(Value::as_str)
}

/// Whether a resource of type `actual` is a `wanted`: itself, `Resource`, or `DomainResource`
/// for everything except the three resources that do not specialise DomainResource.
pub(crate) fn resource_type_matches(actual: &str, wanted: &str) -> bool {
    actual == wanted
        || wanted == "Resource"
        || (wanted == "DomainResource" && !matches!(actual, "Bundle" | "Binary" | "Parameters"))
}

fn node_is(node: &Node<'_>, type_name: &str) -> bool {
    if let Some(t) = node.fhir_type {
        return data_type_matches(t, type_name);
    }
    resource_type(node.value).is_some_and(|rt| resource_type_matches(rt, type_name))
}

/// Type test for data types, with the two relaxations the R4 expressions need: FHIRPath
/// system type names (`DateTime`, as in Observation's `code-value-date` component) match the
/// FHIR primitive of the same name, and the Quantity specialisations (Age, ...) are Quantities.
fn data_type_matches(actual: &str, wanted: &str) -> bool {
    if actual == wanted {
        return true;
    }
    let primitive_alias = actual.starts_with(|c: char| c.is_ascii_lowercase())
        && wanted.starts_with(|c: char| c.is_ascii_uppercase())
        && is_type_suffix(wanted, actual);
    let quantity_subtype =
        wanted == "Quantity" && matches!(actual, "Age" | "Count" | "Distance" | "Duration");
    primitive_alias || quantity_subtype
}

/// The resource type a Reference points to, read from its text: `Type/id`,
/// `Type/id/_history/n`, absolute URLs ending in either, or `#id` (a contained resource).
/// Falls back to `Reference.type` when the text does not say (e.g. `urn:uuid:`).
fn reference_target_type<'a>(reference: &'a Value, root: Root<'a>) -> Option<&'a str> {
    let text = match reference {
        Value::String(s) => Some(s.as_str()),
        Value::Object(map) => map.get("reference").and_then(Value::as_str),
        _ => None,
    };
    if let Some(text) = text {
        if let Some(local) = text.strip_prefix('#') {
            if local.is_empty() {
                return root.resource_type;
            }
            return root
                .value
                .get("contained")
                .and_then(Value::as_array)
                .and_then(|c| {
                    c.iter()
                        .find(|r| r.get("id").and_then(Value::as_str) == Some(local))
                })
                .and_then(resource_type);
        }
        if let Some((t, _id)) = split_type_and_id(text) {
            return Some(t);
        }
    }
    let declared = reference.get("type").and_then(Value::as_str)?;
    // `Reference.type` is a URI; the R4 value set uses bare names, but a full
    // StructureDefinition URL is legal too.
    declared.rsplit('/').next()
}

/// Splits `[base/]Type/id[/_history/vid]` into (`Type`, `id`), checking that `Type` looks
/// like a resource type name and `id` like a FHIR id, so `urn:uuid:...` and arbitrary URLs
/// do not produce a bogus type.
pub(crate) fn split_type_and_id(text: &str) -> Option<(&str, &str)> {
    let text = text.split(['?', '#']).next().unwrap_or(text);
    let mut segments: Vec<&str> = text.split('/').collect();
    if segments.len() >= 4 && segments[segments.len() - 2] == "_history" {
        segments.truncate(segments.len() - 2);
    }
    let [.., type_name, id] = segments.as_slice() else {
        return None;
    };
    let type_ok = type_name.starts_with(|c: char| c.is_ascii_uppercase())
        && type_name.chars().all(|c| c.is_ascii_alphanumeric());
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    (type_ok && id_ok).then_some((*type_name, *id))
}

// ---------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A backtick-delimited identifier: never a keyword.
    Delimited(String),
    Str(String),
    Int(usize),
    External(String),
    Special(String),
    Dot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Pipe,
    Eq,
    NotEq,
    /// An operator outside the subset, kept so the error can name it.
    Unsupported(String),
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) | Tok::Delimited(s) => write!(f, "'{s}'"),
            Tok::Str(s) => write!(f, "string '{s}'"),
            Tok::Int(i) => write!(f, "number {i}"),
            Tok::External(s) => write!(f, "'%{s}'"),
            Tok::Special(s) => write!(f, "'${s}'"),
            Tok::Dot => f.write_str("'.'"),
            Tok::LParen => f.write_str("'('"),
            Tok::RParen => f.write_str("')'"),
            Tok::LBracket => f.write_str("'['"),
            Tok::RBracket => f.write_str("']'"),
            Tok::Comma => f.write_str("','"),
            Tok::Pipe => f.write_str("'|'"),
            Tok::Eq => f.write_str("'='"),
            Tok::NotEq => f.write_str("'!='"),
            Tok::Unsupported(s) => write!(f, "'{s}'"),
            Tok::Eof => f.write_str("end of expression"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: Tok,
    position: usize,
}

fn lex_error(message: impl Into<String>, position: usize) -> FhirPathError {
    FhirPathError {
        message: message.into(),
        position,
    }
}

fn lex(src: &str) -> Result<Vec<Token>, FhirPathError> {
    let bytes = src.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let ident_end = |from: usize| {
            let mut j = from;
            while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                j += 1;
            }
            j
        };
        let kind = match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') || bytes.get(i + 1) == Some(&b'*') => {
                return Err(lex_error("comments are not supported", i));
            }
            b'.' => {
                i += 1;
                Tok::Dot
            }
            b'(' => {
                i += 1;
                Tok::LParen
            }
            b')' => {
                i += 1;
                Tok::RParen
            }
            b'[' => {
                i += 1;
                Tok::LBracket
            }
            b']' => {
                i += 1;
                Tok::RBracket
            }
            b',' => {
                i += 1;
                Tok::Comma
            }
            b'|' => {
                i += 1;
                Tok::Pipe
            }
            b'=' => {
                i += 1;
                Tok::Eq
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                Tok::NotEq
            }
            b'!' if bytes.get(i + 1) == Some(&b'~') => {
                i += 2;
                Tok::Unsupported("!~".into())
            }
            b'<' | b'>' => {
                i += if bytes.get(i + 1) == Some(&b'=') {
                    2
                } else {
                    1
                };
                Tok::Unsupported(src[start..i].into())
            }
            b'+' | b'-' | b'*' | b'/' | b'&' | b'~' => {
                i += 1;
                Tok::Unsupported(src[start..i].into())
            }
            b'%' => {
                if bytes.get(i + 1) == Some(&b'`') || bytes.get(i + 1) == Some(&b'\'') {
                    return Err(lex_error(
                        "quoted environment variables are not supported",
                        i,
                    ));
                }
                let end = ident_end(i + 1);
                if end == i + 1 {
                    return Err(lex_error("'%' must be followed by a name", i));
                }
                let name = src[i + 1..end].to_string();
                i = end;
                Tok::External(name)
            }
            b'$' => {
                let end = ident_end(i + 1);
                let name = src[i + 1..end].to_string();
                i = end;
                Tok::Special(name)
            }
            b'\'' => {
                let (s, end) = lex_quoted(src, i, b'\'')?;
                i = end;
                Tok::Str(s)
            }
            b'`' => {
                let (s, end) = lex_quoted(src, i, b'`')?;
                i = end;
                Tok::Delimited(s)
            }
            b'@' => return Err(lex_error("date/time literals are not supported", i)),
            b'0'..=b'9' => {
                let mut j = i;
                while j < bytes.len() && bytes[j].is_ascii_digit() {
                    j += 1;
                }
                if bytes.get(j) == Some(&b'.') && bytes.get(j + 1).is_some_and(u8::is_ascii_digit) {
                    return Err(lex_error("decimal literals are not supported", i));
                }
                let n = src[i..j]
                    .parse::<usize>()
                    .map_err(|_| lex_error("integer literal is too large", i))?;
                i = j;
                Tok::Int(n)
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let end = ident_end(i);
                let name = src[i..end].to_string();
                i = end;
                Tok::Ident(name)
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(lex_error(format!("unexpected character '{ch}'"), i));
            }
        };
        tokens.push(Token {
            kind,
            position: start,
        });
    }
    tokens.push(Token {
        kind: Tok::Eof,
        position: src.len(),
    });
    Ok(tokens)
}

/// Reads a `'string'` or `` `identifier` `` starting at `start`, handling FHIRPath escapes.
fn lex_quoted(src: &str, start: usize, quote: u8) -> Result<(String, usize), FhirPathError> {
    let mut out = String::new();
    let mut chars = src[start + 1..].char_indices();
    while let Some((offset, c)) = chars.next() {
        let at = start + 1 + offset;
        if c as u32 == u32::from(quote) {
            return Ok((out, at + 1));
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some((_, e)) = chars.next() else {
            break;
        };
        match e {
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'f' => out.push('\u{c}'),
            'u' => {
                let hex: String = chars.by_ref().take(4).map(|(_, h)| h).collect();
                let decoded = u32::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 4)
                    .and_then(char::from_u32)
                    .ok_or_else(|| lex_error("invalid \\u escape", at))?;
                out.push(decoded);
            }
            '\'' | '"' | '`' | '\\' | '/' => out.push(e),
            other => return Err(lex_error(format!("invalid escape '\\{other}'"), at)),
        }
    }
    Err(lex_error("unterminated quoted text", start))
}

// ---------------------------------------------------------------------------------------
// Parser: recursive descent over FHIRPath's precedence levels that the subset needs,
// loosest first: `and`, `=`/`!=`, `|`, `is`/`as`, then `.`/`[]` invocations.

/// Deep enough for any real search expression, shallow enough that hostile input
/// (e.g. ten thousand parentheses in a posted SearchParameter) cannot overflow the stack.
const MAX_DEPTH: usize = 64;

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        // `lex` always ends with Eof and `advance` never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if self.pos + 1 < self.tokens.len() {
            self.pos += 1;
        }
        token
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, FhirPathError> {
        Err(lex_error(message, self.peek().position))
    }

    fn expect(&mut self, kind: Tok) -> Result<(), FhirPathError> {
        if self.peek().kind == kind {
            self.advance();
            Ok(())
        } else {
            self.error(format!("expected {kind}, found {}", self.peek().kind))
        }
    }

    fn keyword(&self) -> Option<&str> {
        match &self.peek().kind {
            Tok::Ident(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn expression(&mut self) -> Result<Ast, FhirPathError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.error("expression is nested too deeply");
        }
        let result = self.and_expr();
        self.depth -= 1;
        result
    }

    fn and_expr(&mut self) -> Result<Ast, FhirPathError> {
        let mut left = self.equality()?;
        while self.keyword() == Some("and") {
            self.advance();
            let right = self.equality()?;
            left = Ast::And(Box::new(left), Box::new(right));
        }
        if let Some(op @ ("or" | "xor" | "implies")) = self.keyword() {
            return self.error(format!("operator '{op}' is not supported"));
        }
        Ok(left)
    }

    fn equality(&mut self) -> Result<Ast, FhirPathError> {
        let position = self.peek().position;
        let mut left = self.union()?;
        if matches!(left, Ast::StringLiteral(_))
            && !matches!(self.peek().kind, Tok::Eq | Tok::NotEq)
        {
            return Err(literal_error(position));
        }
        loop {
            let negate = match self.peek().kind {
                Tok::Eq => false,
                Tok::NotEq => true,
                _ => break,
            };
            self.advance();
            let right = self.union()?;
            left = Ast::Equals {
                left: Box::new(left),
                right: Box::new(right),
                negate,
            };
        }
        if let Some(op @ ("in" | "contains")) = self.keyword() {
            return self.error(format!("operator '{op}' is not supported"));
        }
        Ok(left)
    }

    fn union(&mut self) -> Result<Ast, FhirPathError> {
        let position = self.peek().position;
        let first = self.type_expr()?;
        if self.peek().kind != Tok::Pipe {
            return Ok(first);
        }
        let mut branches = vec![first];
        while self.peek().kind == Tok::Pipe {
            self.advance();
            branches.push(self.type_expr()?);
        }
        if branches.iter().any(|b| matches!(b, Ast::StringLiteral(_))) {
            return Err(literal_error(position));
        }
        Ok(Ast::Union(branches))
    }

    fn type_expr(&mut self) -> Result<Ast, FhirPathError> {
        let position = self.peek().position;
        let mut left = self.invocation_chain()?;
        while let Some(op @ ("is" | "as")) = self.keyword() {
            if matches!(left, Ast::StringLiteral(_)) {
                return Err(literal_error(position));
            }
            let is = op == "is";
            self.advance();
            let type_name = self.type_specifier()?;
            left = if is {
                make_is(left, type_name)
            } else {
                append_step(left, Step::OfType(type_name))
            };
        }
        Ok(left)
    }

    /// A type specifier: `T`, `FHIR.T` or `System.T` (the namespace only disambiguates).
    fn type_specifier(&mut self) -> Result<String, FhirPathError> {
        let first = self.identifier("a type name")?;
        if self.peek().kind == Tok::Dot && matches!(first.as_str(), "FHIR" | "System") {
            self.advance();
            return self.identifier("a type name");
        }
        Ok(first)
    }

    fn identifier(&mut self, what: &str) -> Result<String, FhirPathError> {
        match self.peek().kind.clone() {
            Tok::Ident(s) | Tok::Delimited(s) => {
                self.advance();
                Ok(s)
            }
            other => self.error(format!("expected {what}, found {other}")),
        }
    }

    fn invocation_chain(&mut self) -> Result<Ast, FhirPathError> {
        let position = self.peek().position;
        let mut node = self.term()?;
        loop {
            if matches!(node, Ast::StringLiteral(_))
                && matches!(self.peek().kind, Tok::Dot | Tok::LBracket)
            {
                return Err(literal_error(position));
            }
            match self.peek().kind {
                Tok::Dot => {
                    self.advance();
                    let position = self.peek().position;
                    let name = self.identifier("a name after '.'")?;
                    node = if self.peek().kind == Tok::LParen {
                        self.function(node, &name, position)?
                    } else {
                        append_step(node, member_step(name))
                    };
                }
                Tok::LBracket => {
                    self.advance();
                    let Tok::Int(i) = self.peek().kind else {
                        return self.error("only integer literals are supported as an index");
                    };
                    self.advance();
                    self.expect(Tok::RBracket)?;
                    node = append_step(node, Step::Index(i));
                }
                _ => return Ok(node),
            }
        }
    }

    fn term(&mut self) -> Result<Ast, FhirPathError> {
        let token = self.advance();
        match token.kind {
            Tok::LParen => {
                let inner = self.expression()?;
                self.expect(Tok::RParen)?;
                Ok(inner)
            }
            Tok::Str(s) => Ok(Ast::StringLiteral(Value::String(s))),
            Tok::Ident(s) if s == "true" || s == "false" => Ok(Ast::BoolLiteral(s == "true")),
            Tok::External(name) if name == "resource" => Ok(path(Start::Resource)),
            Tok::External(name) => Err(lex_error(
                format!("environment variable '%{name}' is not supported (only %resource)"),
                token.position,
            )),
            Tok::Special(name) if name == "this" => Ok(path(Start::Focus)),
            Tok::Special(name) => Err(lex_error(
                format!("'${name}' is not supported (only $this)"),
                token.position,
            )),
            Tok::Ident(name) | Tok::Delimited(name) => {
                if self.peek().kind == Tok::LParen {
                    return self.function(path(Start::Focus), &name, token.position);
                }
                // Element names are lowerCamelCase in FHIR, so a leading capital is a type.
                if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                    Ok(path(Start::TypeName(name)))
                } else {
                    Ok(append_step(path(Start::Focus), member_step(name)))
                }
            }
            Tok::Int(_) => Err(lex_error(
                "number literals are only supported as an index",
                token.position,
            )),
            other => Err(lex_error(format!("unexpected {other}"), token.position)),
        }
    }

    fn function(&mut self, input: Ast, name: &str, position: usize) -> Result<Ast, FhirPathError> {
        self.expect(Tok::LParen)?;
        let step = match name {
            "where" => {
                let criteria = self.expression()?;
                Step::Where(Box::new(criteria))
            }
            "exists" => {
                if self.peek().kind != Tok::RParen {
                    return self.error("exists() with criteria is not supported");
                }
                self.advance();
                return Ok(Ast::Exists(Box::new(input)));
            }
            "resolve" => Step::Resolve(position),
            "extension" => match &self.peek().kind {
                Tok::Str(url) => {
                    let url = url.clone();
                    self.advance();
                    Step::Extension(url)
                }
                _ => return self.error("extension() takes a string literal url"),
            },
            "as" | "ofType" => Step::OfType(self.type_specifier()?),
            other => {
                return Err(lex_error(
                    format!(
                        "function '{other}()' is not supported (supported: where, exists, resolve, as, ofType, extension)"
                    ),
                    position,
                ));
            }
        };
        self.expect(Tok::RParen)?;
        Ok(append_step(input, step))
    }
}

/// String literals only ever stand beside `=`/`!=` in search expressions, and they do not
/// live as long as the resource, so they may not become part of a result (see `Ast::StringLiteral`).
fn literal_error(position: usize) -> FhirPathError {
    lex_error(
        "string literals are only supported as an operand of '=' or '!='",
        position,
    )
}

fn member_step(name: String) -> Step {
    let choice = choice_types(&name);
    Step::Member { name, choice }
}

fn path(start: Start) -> Ast {
    Ast::Path {
        start,
        steps: Vec::new(),
    }
}

/// Extends a path in place (so `(a.b as T).c` is one flat path), or starts a new path whose
/// input is the given expression.
fn append_step(ast: Ast, step: Step) -> Ast {
    match ast {
        Ast::Path { start, mut steps } => {
            steps.push(step);
            Ast::Path { start, steps }
        }
        other => Ast::Path {
            start: Start::Expr(Box::new(other)),
            steps: vec![step],
        },
    }
}

fn make_is(operand: Ast, type_name: String) -> Ast {
    match operand {
        Ast::Path { start, mut steps } if matches!(steps.last(), Some(Step::Resolve(_))) => {
            steps.pop();
            Ast::ResolveIs {
                refs: Box::new(Ast::Path { start, steps }),
                type_name,
            }
        }
        operand => Ast::Is {
            operand: Box::new(operand),
            type_name,
        },
    }
}

/// `resolve()` would need a database to return the target; only its type is known from
/// the reference text, so it is accepted solely as `resolve() is T`.
fn check_resolve(ast: &Ast) -> Result<(), FhirPathError> {
    match ast {
        Ast::Path { start, steps } => {
            if let Start::Expr(inner) = start {
                check_resolve(inner)?;
            }
            for step in steps {
                match step {
                    Step::Resolve(position) => {
                        return Err(lex_error(
                            "resolve() is only supported as 'resolve() is Type'",
                            *position,
                        ));
                    }
                    Step::Where(criteria) => check_resolve(criteria)?,
                    _ => {}
                }
            }
            Ok(())
        }
        Ast::Union(branches) => branches.iter().try_for_each(check_resolve),
        Ast::Equals { left, right, .. } | Ast::And(left, right) => {
            check_resolve(left)?;
            check_resolve(right)
        }
        Ast::Is { operand, .. } => check_resolve(operand),
        Ast::ResolveIs { refs, .. } => check_resolve(refs),
        Ast::Exists(inner) => check_resolve(inner),
        Ast::StringLiteral(_) | Ast::BoolLiteral(_) => Ok(()),
    }
}

/// Every choice element (`name[x]`) of the R4 resources and data types with its allowed types,
/// generated from `profiles-resources.json` and `profiles-types.json` (4.0.1). Matching a key
/// `name` + Type only for these names and types is what keeps `performerType` from being read
/// as `performer[x]` and `versionNeeded` as `version[x]`; within one parent no plain element
/// is spelt like a choice element plus one of its types. Sorted for binary search.
#[rustfmt::skip] // One line per element keeps the generated table reviewable.
const CHOICE_ELEMENTS: &[(&str, &[&str])] = &[
    ("abatement", &["dateTime", "Age", "Period", "Range", "string"]),
    ("additive", &["CodeableConcept", "Reference"]),
    ("age", &["Age", "Range", "string", "CodeableConcept"]),
    ("allowed", &["unsignedInt", "string", "Money", "boolean", "CodeableConcept"]),
    ("amount", &["Quantity", "Range", "string", "Ratio"]),
    ("answer", &["boolean", "decimal", "integer", "date", "dateTime", "time", "string", "Coding", "Quantity", "Reference"]),
    ("asNeeded", &["boolean", "CodeableConcept"]),
    ("author", &["Reference", "string"]),
    ("born", &["Period", "date", "string"]),
    ("bounds", &["Duration", "Range", "Period"]),
    ("characteristic", &["CodeableConcept", "Quantity"]),
    ("chargeItem", &["Reference", "CodeableConcept"]),
    ("code", &["Reference", "CodeableConcept"]),
    ("collected", &["dateTime", "Period"]),
    ("content", &["string", "Attachment", "Reference"]),
    ("created", &["dateTime", "Period"]),
    ("date", &["Period", "dateTime"]),
    ("deceased", &["boolean", "Age", "Range", "date", "string", "dateTime"]),
    ("defaultValue", &["base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id", "instant", "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt", "uri", "url", "uuid", "Address", "Age", "Annotation", "Attachment", "CodeableConcept", "Coding", "ContactPoint", "Count", "Distance", "Duration", "HumanName", "Identifier", "Money", "Period", "Quantity", "Range", "Ratio", "Reference", "SampledData", "Signature", "Timing", "ContactDetail", "Contributor", "DataRequirement", "Expression", "ParameterDefinition", "RelatedArtifact", "TriggerDefinition", "UsageContext", "Dosage", "Meta"]),
    ("definingSubstance", &["Reference", "CodeableConcept"]),
    ("definition", &["Reference", "canonical", "CodeableConcept", "Expression", "DataRequirement", "TriggerDefinition", "uri"]),
    ("detail", &["Quantity", "Range", "CodeableConcept", "string", "boolean", "integer", "Ratio"]),
    ("diagnosis", &["CodeableConcept", "Reference"]),
    ("dose", &["Range", "Quantity"]),
    ("doseNumber", &["positiveInt", "string"]),
    ("due", &["date", "Duration"]),
    ("effective", &["dateTime", "Period", "Timing", "instant"]),
    ("entity", &["CodeableConcept", "Reference"]),
    ("event", &["Coding", "uri"]),
    ("example", &["boolean", "canonical"]),
    ("fastingStatus", &["CodeableConcept", "Duration"]),
    ("fixed", &["base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id", "instant", "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt", "uri", "url", "uuid", "Address", "Age", "Annotation", "Attachment", "CodeableConcept", "Coding", "ContactPoint", "Count", "Distance", "Duration", "HumanName", "Identifier", "Money", "Period", "Quantity", "Range", "Ratio", "Reference", "SampledData", "Signature", "Timing", "ContactDetail", "Contributor", "DataRequirement", "Expression", "ParameterDefinition", "RelatedArtifact", "TriggerDefinition", "UsageContext", "Dosage", "Meta"]),
    ("identified", &["dateTime", "Period"]),
    ("indication", &["CodeableConcept", "Reference"]),
    ("item", &["CodeableConcept", "Reference"]),
    ("legallyBinding", &["Attachment", "Reference"]),
    ("location", &["Address", "Reference", "CodeableConcept"]),
    ("manufacturer", &["string", "Reference"]),
    ("maxValue", &["date", "dateTime", "instant", "time", "decimal", "integer", "positiveInt", "unsignedInt", "Quantity"]),
    ("medication", &["CodeableConcept", "Reference"]),
    ("minValue", &["date", "dateTime", "instant", "time", "decimal", "integer", "positiveInt", "unsignedInt", "Quantity"]),
    ("minimumVolume", &["Quantity", "string"]),
    ("module", &["uri", "canonical", "CodeableConcept"]),
    ("multipleBirth", &["boolean", "integer"]),
    ("name", &["url", "Reference"]),
    ("occurred", &["Period", "dateTime"]),
    ("occurrence", &["dateTime", "Period", "Timing", "string"]),
    ("offset", &["Duration", "Range"]),
    ("onset", &["dateTime", "Age", "Period", "Range", "string"]),
    ("participantEffective", &["dateTime", "Period", "Duration", "Timing"]),
    ("pattern", &["base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id", "instant", "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt", "uri", "url", "uuid", "Address", "Age", "Annotation", "Attachment", "CodeableConcept", "Coding", "ContactPoint", "Count", "Distance", "Duration", "HumanName", "Identifier", "Money", "Period", "Quantity", "Range", "Ratio", "Reference", "SampledData", "Signature", "Timing", "ContactDetail", "Contributor", "DataRequirement", "Expression", "ParameterDefinition", "RelatedArtifact", "TriggerDefinition", "UsageContext", "Dosage", "Meta"]),
    ("performed", &["dateTime", "Period", "string", "Age", "Range"]),
    ("probability", &["decimal", "Range"]),
    ("procedure", &["CodeableConcept", "Reference"]),
    ("product", &["Reference", "CodeableConcept"]),
    ("quantity", &["Quantity", "Ratio", "Range"]),
    ("rate", &["Ratio", "Quantity", "Range"]),
    ("reported", &["boolean", "Reference"]),
    ("scheduled", &["Timing", "Period", "string"]),
    ("seriesDoses", &["positiveInt", "string"]),
    ("serviced", &["date", "Period"]),
    ("source", &["uri", "canonical", "Attachment", "Reference"]),
    ("start", &["date", "CodeableConcept"]),
    ("statusReason", &["CodeableConcept", "Reference"]),
    ("studyEffective", &["dateTime", "Period", "Duration", "Timing"]),
    ("subject", &["CodeableConcept", "Reference"]),
    ("substance", &["CodeableConcept", "Reference"]),
    ("target", &["Identifier", "Reference", "uri", "canonical"]),
    ("time", &["dateTime", "Period"]),
    ("timing", &["Timing", "dateTime", "Age", "Period", "Range", "Duration", "date", "Reference"]),
    ("topic", &["CodeableConcept", "Reference"]),
    ("used", &["unsignedInt", "string", "Money"]),
    ("value", &["string", "base64Binary", "boolean", "Quantity", "Attachment", "Reference", "code", "Coding", "integer", "dateTime", "decimal", "date", "time", "uri", "Money", "CodeableConcept", "Range", "Ratio", "SampledData", "Period", "canonical", "id", "instant", "markdown", "oid", "positiveInt", "unsignedInt", "url", "uuid", "Address", "Age", "Annotation", "ContactPoint", "Count", "Distance", "Duration", "HumanName", "Identifier", "Signature", "Timing", "ContactDetail", "Contributor", "DataRequirement", "Expression", "ParameterDefinition", "RelatedArtifact", "TriggerDefinition", "UsageContext", "Dosage", "Meta"]),
    ("when", &["Period", "Range"]),
];

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use serde_json::json;

    fn roots(expr: &str) -> Option<Vec<String>> {
        let e = parse(expr).unwrap();
        let mut out = Vec::new();
        e.root_fields("Observation", &mut out).map(|_| {
            out.into_iter()
                .map(|(name, choice)| format!("{name}{}", if choice { "[x]" } else { "" }))
                .collect()
        })
    }

    #[test]
    fn root_fields_are_the_first_members_from_the_resource() {
        let some = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            roots("Observation.subject.where(resolve() is Patient)"),
            some(&["subject[x]"])
        );
        assert_eq!(
            roots("(Observation.value as Quantity) | Observation.component.value"),
            some(&["value[x]", "component"])
        );
        assert_eq!(roots("Resource.meta.tag"), some(&["meta"]));
        assert_eq!(
            roots("Observation.component.where(code.coding.code = 'x').value"),
            some(&["component"])
        );
        assert_eq!(
            roots("Observation.extension('http://e.org/x').value"),
            some(&["extension"])
        );
        assert_eq!(
            roots("Condition.code | Observation.code | Procedure.code"),
            some(&["code[x]"])
        );
        assert_eq!(roots("Observation.component[0]"), some(&["component"]));
        assert_eq!(roots("Observation[0].code"), None);
    }

    /// Evaluates `expr` on `resource` and compares the values with `expected` (a JSON array).
    fn check(expr: &str, resource: Value, expected: Value) {
        let parsed = parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let got: Vec<Value> = parsed
            .evaluate(&resource)
            .iter()
            .map(|n| n.value.clone())
            .collect();
        assert_eq!(Value::Array(got), expected, "{expr}");
    }

    fn types(expr: &str, resource: &Value) -> Vec<Option<&'static str>> {
        let parsed = parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        parsed
            .evaluate(resource)
            .iter()
            .map(|n| n.fhir_type)
            .collect()
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation", "id": "bp",
            "status": "final",
            "_status": {"extension": [{"url": "x"}]},
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}], "text": "BP"},
            "subject": {"reference": "Patient/p1/_history/2"},
            "performer": [{"reference": "http://example.org/fhir/Practitioner/dr"}, {"reference": "#org"}],
            "performerType": "not a choice",
            "valueQuantity": {"value": 120, "unit": "mmHg"},
            "component": [
                {"code": {"text": "sys"}, "valueQuantity": {"value": 120}},
                {"code": {"text": "dia"}, "valueQuantity": {"value": 80}},
                {"code": {"text": "note"}, "valueString": "ok"}
            ],
            "contained": [{"resourceType": "Organization", "id": "org"}]
        })
    }

    #[test]
    fn paths_and_type_names() {
        let obs = observation();
        check("Observation.status", obs.clone(), json!(["final"]));
        check("Patient.name", obs.clone(), json!([]));
        check("Resource.id", obs.clone(), json!(["bp"]));
        check("DomainResource.id", obs.clone(), json!(["bp"]));
        check(
            "Observation.code.coding.code",
            obs.clone(),
            json!(["85354-9"]),
        );
        check(
            "Observation.component.code.text",
            obs.clone(),
            json!(["sys", "dia", "note"]),
        );
        check(
            "Observation.component[1].code.text",
            obs.clone(),
            json!(["dia"]),
        );
        check("Observation.component[7]", obs.clone(), json!([]));
        check(
            "Observation.status | Patient.gender",
            obs.clone(),
            json!(["final"]),
        );
        check("(Observation.status)", obs.clone(), json!(["final"]));
        check("Observation.`status`", obs.clone(), json!(["final"]));
        check("%resource.id", obs.clone(), json!(["bp"]));
        check(
            "Observation.status | Observation.status",
            obs.clone(),
            json!(["final"]),
        );
        let names = json!({"resourceType": "Patient", "name": [{"given": ["Jo", "Al"]}, {"given": ["Jo"], "family": "Al"}]});
        check(
            "Patient.name.given | Patient.name.family",
            names.clone(),
            json!(["Jo", "Al"]),
        );
        check("Patient.name.given", names, json!(["Jo", "Al", "Jo"]));
        let bundle = json!({"resourceType": "Bundle", "id": "b", "entry": [{"resource": {"resourceType": "Composition", "id": "c"}}]});
        check("DomainResource.id", bundle.clone(), json!([]));
        check("Resource.id", bundle.clone(), json!(["b"]));
        check("Bundle.entry[0].resource.id", bundle, json!(["c"]));
    }

    #[test]
    fn extension_by_url() {
        let p = json!({"resourceType": "Patient", "extension": [
            {"url": "http://x/eye", "valueString": "blue"},
            {"url": "http://x/other", "valueString": "no"}]});
        check(
            "Patient.extension('http://x/eye').value",
            p.clone(),
            json!(["blue"]),
        );
        check("Patient.extension('http://x/none').value", p, json!([]));
        assert!(parse("Patient.extension(Patient.id)").is_err());
    }

    #[test]
    fn choice_elements() {
        assert!(
            CHOICE_ELEMENTS.is_sorted_by_key(|(name, _)| *name),
            "binary search needs order"
        );
        let obs = observation();
        check("Observation.value.value", obs.clone(), json!([120]));
        assert_eq!(types("Observation.value", &obs), [Some("Quantity")]);
        check(
            "(Observation.value as Quantity).unit",
            obs.clone(),
            json!(["mmHg"]),
        );
        check(
            "Observation.value.as(Quantity).unit",
            obs.clone(),
            json!(["mmHg"]),
        );
        check(
            "(Observation.value as CodeableConcept)",
            obs.clone(),
            json!([]),
        );
        // Several items: filtered instead of a FHIRPath error.
        check(
            "(Observation.component.value as Quantity).value",
            obs.clone(),
            json!([120, 80]),
        );
        check(
            "Observation.component.value.ofType(string)",
            obs.clone(),
            json!(["ok"]),
        );
        check(
            "Observation.component.value.as(String)",
            obs.clone(),
            json!(["ok"]),
        );
        check(
            "Observation.component.value as FHIR.string",
            obs.clone(),
            json!(["ok"]),
        );
        // `performerType` is an element of its own, not `performer[x]`.
        check(
            "Observation.performer.reference.count",
            obs.clone(),
            json!([]),
        );
        let proc = json!({"resourceType": "Procedure", "performer": [], "performerType": "x"});
        check("Procedure.performer", proc, json!([]));
        let plan = json!({"resourceType": "PlanDefinition", "versionNeeded": "x"});
        check("PlanDefinition.version", plan, json!([]));
        let cond = json!({"resourceType": "Condition", "onsetAge": {"value": 4, "system": "http://unitsofmeasure.org", "code": "a"}});
        check("Condition.onset.as(Age).value", cond.clone(), json!([4]));
        check(
            "Condition.onset.as(Quantity).value",
            cond.clone(),
            json!([4]),
        );
        check("Condition.onset.as(dateTime)", cond, json!([]));
        let obs_dt = json!({"resourceType": "Observation", "valueDateTime": "2020-01-01"});
        check(
            "Observation.value.as(DateTime)",
            obs_dt.clone(),
            json!(["2020-01-01"]),
        );
        assert_eq!(types("Observation.value", &obs_dt), [Some("dateTime")]);
    }

    #[test]
    fn where_equality_and_booleans() {
        let patient = json!({
            "resourceType": "Patient",
            "telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}],
            "deceasedBoolean": false
        });
        check(
            "Patient.telecom.where(system='email').value",
            patient.clone(),
            json!(["a@b"]),
        );
        check(
            "Patient.telecom.where(system!='email').value",
            patient.clone(),
            json!(["1"]),
        );
        check(
            "Patient.telecom.where(system='fax')",
            patient.clone(),
            json!([]),
        );
        check(
            "Patient.telecom.where(system = 'phone' and value = '1').value",
            patient.clone(),
            json!(["1"]),
        );
        check(
            "Patient.telecom.where($this.system = 'phone').value",
            patient.clone(),
            json!(["1"]),
        );
        let deceased = "Patient.deceased.exists() and Patient.deceased != false";
        check(deceased, patient.clone(), json!([false]));
        check(
            deceased,
            json!({"resourceType": "Patient", "deceasedBoolean": true}),
            json!([true]),
        );
        check(
            deceased,
            json!({"resourceType": "Patient", "deceasedDateTime": "2020"}),
            json!([true]),
        );
        check(deceased, json!({"resourceType": "Patient"}), json!([false]));
        check("Patient.name.exists()", patient.clone(), json!([false]));
        check("Patient.telecom.exists()", patient.clone(), json!([true]));
        check("Patient.gender = 'x'", patient.clone(), json!([]));
        check(
            "Patient.deceased is boolean",
            patient.clone(),
            json!([true]),
        );
        check("Patient is Patient", patient.clone(), json!([true]));
    }

    #[test]
    fn resolve_is_type() {
        let obs = observation();
        check(
            "Observation.subject.where(resolve() is Patient).reference",
            obs.clone(),
            json!(["Patient/p1/_history/2"]),
        );
        check(
            "Observation.subject.where(resolve() is Group)",
            obs.clone(),
            json!([]),
        );
        check(
            "Observation.performer.where(resolve() is Practitioner).reference",
            obs.clone(),
            json!(["http://example.org/fhir/Practitioner/dr"]),
        );
        check(
            "Observation.performer.where(resolve() is Organization).reference",
            obs.clone(),
            json!(["#org"]),
        );
        let urn = json!({"resourceType": "Observation", "subject": {"reference": "urn:uuid:1234"}});
        check(
            "Observation.subject.where(resolve() is Patient)",
            urn,
            json!([]),
        );
        let typed = json!({"resourceType": "Observation", "subject": {"reference": "urn:uuid:1234", "type": "Patient"}});
        check(
            "Observation.subject.where(resolve() is Patient).type",
            typed,
            json!(["Patient"]),
        );
        let task = json!({"resourceType": "Task", "for": {"reference": "Patient/1"}});
        check(
            "Task.for.where(resolve() is Patient).reference",
            task,
            json!(["Patient/1"]),
        );
    }

    #[test]
    fn refuses_unsupported_syntax() {
        for (expr, fragment) in [
            ("Patient.name.first()", "function 'first()'"),
            ("Patient.name or Patient.id", "operator 'or'"),
            ("Patient.a + 1", "'+'"),
            ("Patient.birthDate > @2020", "date/time literals"),
            ("Patient.a >= Patient.b", "'>='"),
            ("Patient.name.resolve()", "resolve()"),
            ("Patient.link.other.resolve().name", "resolve()"),
            ("'abc'", "string literals"),
            ("Patient.a | 'x'", "string literals"),
            ("'x'.length", "string literals"),
            ("'x' as string", "string literals"),
            ("Patient.a.where('x')", "string literals"),
            ("'x' and Patient.a", "string literals"),
            ("Patient.a = 1", "number literals"),
            ("%context.id", "%context"),
            ("Patient.name.where(", "expected"),
            ("Patient.name[x]", "index"),
            ("Patient.name.exists(given)", "exists()"),
            ("Patient.name.given 'x'", "unexpected"),
            ("Patient.a = 1.5", "decimal"),
            ("'unterminated", "unterminated"),
            ("Patient.ñ", "unexpected character"),
            ("", "unexpected end"),
        ] {
            match parse(expr) {
                Ok(e) => panic!("{expr} parsed as {e:?}"),
                Err(e) => assert!(e.to_string().contains(fragment), "{expr}: {e}"),
            }
        }
        let deep = format!("{}Patient.id{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(parse(&deep).is_err());
    }

    /// Random token soup must be refused or evaluated, never panic.
    #[test]
    fn random_expressions_never_panic() {
        const FRAGMENTS: [&str; 36] = [
            "Observation",
            "Resource",
            ".",
            "value",
            "component",
            "(",
            ")",
            "[",
            "]",
            "0",
            "'x'",
            "|",
            "=",
            "!=",
            "and",
            "or",
            "is",
            "as",
            "where(",
            "resolve()",
            "exists()",
            "%resource",
            "$this",
            "`a`",
            "\\",
            "'",
            "ofType(",
            "Quantity",
            " ",
            "1.5",
            "@",
            "ñ",
            "%",
            "$",
            "subject",
            ",",
        ];
        let resource = observation();
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            // xorshift64: deterministic, dependency-free randomness.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parsed = 0;
        for _ in 0..20_000 {
            let len = 1 + next() % 12;
            let expr: String = (0..len)
                .map(|_| FRAGMENTS[(next() % FRAGMENTS.len() as u64) as usize])
                .collect();
            if let Ok(e) = parse(&expr) {
                parsed += 1;
                let _ = e.evaluate(&resource);
                let _ = e.evaluate(&json!([1, {"resourceType": 5}]));
            }
        }
        println!("random expressions: {parsed} of 20000 parsed and evaluated");
    }

    /// Every official R4 expression parses; the README records 1,372 of them.
    #[test]
    fn parses_all_official_expressions() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fhir-r4/definitions/search-parameters.json"
        );
        let text = std::fs::read_to_string(path).expect("search-parameters.json");
        let bundle: Value = serde_json::from_str(&text).expect("bundle JSON");
        let mut total = 0;
        let mut failures = Vec::new();
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            let expressions = resource["expression"].as_str().into_iter().chain(
                resource["component"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["expression"].as_str()),
            );
            for expr in expressions {
                total += 1;
                if let Err(e) = parse(expr) {
                    failures.push(format!("{expr}: {e}"));
                }
            }
        }
        println!(
            "parsed {} of {total} expressions (incl. composite components)",
            total - failures.len()
        );
        assert!(failures.is_empty(), "{failures:#?}");
        assert!(total >= 1372);
    }
}
